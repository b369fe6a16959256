"""A chart sent again (patient-view each time the chart is opened) is answered from the kept cards:
the same bytes as evaluating it again, uuids minted from the new hookInstance, and never when the
answer could differ or a warning must be logged again."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from cds_service import pipeline
from cds_service.hooks.catalogue import services
from cds_service.hooks.models import parse_hook_request
from cds_service.jsonio import dump_bytes
from cds_service.render.cards import _document, mint
from cds_service.settings import Settings
from cds_service.web.app import create_app

from .conftest import SERVICE_URL, TODAY, demo_files, hook_body, load


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The patient id of every chart whose facts were derived (a kept answer derives none)."""
    seen: list[str] = []
    original = pipeline.derive_facts

    def spy(chart: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(chart.patient_id)
        return original(chart, *args, **kwargs)

    monkeypatch.setattr(pipeline, "derive_facts", spy)
    yield seen


@pytest.fixture
def signed_app(tmp_path):
    settings = Settings(
        auth_required=False, database_url=f"sqlite:///{tmp_path / 'cds.db'}", audit_key="r" * 32
    )
    app = create_app(settings, today=lambda: TODAY)
    app.config["TESTING"] = False
    return app


def _fresh(app: Any, body: dict[str, Any]) -> bytes:
    """The answer of evaluating the request again, as `cds-service evaluate` does (nothing kept)."""
    outcome = pipeline.answer(
        copy.deepcopy(body),
        services()["crc-metastases"],
        app.extensions["cds.settings"],
        TODAY,
        base_url="http://localhost/",
    )
    return dump_bytes(outcome.answer)


def test_an_answer_written_from_its_pieces_is_the_whole_document_written_again(signed_app):
    """A kept answer is sent with new uuids placed between pieces of its JSON, never written again:
    for every demo chart those bytes are exactly those of writing the whole document."""
    settings = signed_app.extensions["cds.settings"]
    service = services()["crc-metastases"]
    with_cards = 0
    for path in demo_files():
        request = parse_hook_request(hook_body(load(path)), service.hook)
        drafts = pipeline._draft(request, service, settings, TODAY, issuer=None, base_url=None).drafts
        assert all(d.pieces is not None for d in drafts), path.name
        whole = tuple(dataclasses.replace(d, pieces=None) for d in drafts)
        for hook_instance in ("a", "d1e0a3c4-0000-4000-8000-000000000009"):
            fast, slow = mint(drafts, hook_instance), mint(whole, hook_instance)
            assert fast == slow, path.name
            assert fast.json == dump_bytes(
                {
                    "cards": [
                        _document(d, c.uuid, c.suggestion_uuids)
                        for d, c in zip(drafts, fast.cards, strict=True)
                    ]
                }
            )
        with_cards += bool(drafts)
    assert with_cards >= 10


def test_every_demo_chart_sent_again_gets_the_answer_evaluating_it_again_gives(signed_app, evaluations):
    client = signed_app.test_client()
    for path in demo_files():
        bundle = load(path)
        answers = []
        for hook_instance in ("d1e0a3c4-0000-4000-8000-000000000001", "d1e0a3c4-0000-4000-8000-000000000002"):
            body = hook_body(bundle, hook_instance)
            resp = client.post(SERVICE_URL, json=body)
            assert resp.status_code == 200, path.name
            assert resp.data == _fresh(signed_app, body), path.name
            answers.append(resp.get_json())
        # New uuids for the new hookInstance, signed as ours; every other byte the same.
        first, second = answers
        for a, b in zip(first["cards"], second["cards"], strict=True):
            assert a["uuid"] != b["uuid"]
            assert {**a, "uuid": "", "suggestions": None} == {**b, "uuid": "", "suggestions": None}
    # Derived once per chart on the HTTP calls (+1 per call to _fresh): the second calls reused.
    http_derivations = len(evaluations) - 2 * len(demo_files())
    assert http_derivations == len(demo_files())
    assert len(signed_app.extensions["cds.answers"]) == len(demo_files())


def test_a_chart_that_differs_in_one_value_is_evaluated_again(signed_app, evaluations):
    client = signed_app.test_client()
    bundle = load(demo_files()[0])
    assert client.post(SERVICE_URL, json=hook_body(bundle)).status_code == 200
    changed = copy.deepcopy(bundle)
    cea = next(
        e["resource"]
        for e in changed["entry"]
        if e["resource"]["resourceType"] == "Observation" and "valueQuantity" in e["resource"]
    )
    cea["valueQuantity"]["value"] = 987.5
    body = hook_body(changed)
    resp = client.post(SERVICE_URL, json=body)
    assert len(evaluations) == 2
    assert resp.data == _fresh(signed_app, body)


def test_another_day_is_evaluated_again(tmp_path, evaluations):
    days = [TODAY]
    app = create_app(
        Settings(auth_required=False, database_url=f"sqlite:///{tmp_path / 'cds.db'}"), today=lambda: days[-1]
    )
    client = app.test_client()
    bundle = load(demo_files()[0])
    assert client.post(SERVICE_URL, json=hook_body(bundle)).status_code == 200
    days.append(TODAY + dt.timedelta(days=400))
    assert client.post(SERVICE_URL, json=hook_body(bundle)).status_code == 200
    assert len(evaluations) == 2


def test_a_chart_with_a_resource_that_is_not_valid_fhir_is_never_kept_and_warns_every_time(
    client, app, evaluations, caplog
):
    bundle = load(demo_files()[0])
    condition = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition")
    condition["onsetDateTime"] = "not a date"
    caplog.set_level(logging.WARNING, logger="cds_service.facts")
    for _ in range(2):
        assert client.post(SERVICE_URL, json=hook_body(bundle)).status_code == 200
    assert len(evaluations) == 2
    assert len([r for r in caplog.records if "not valid FHIR" in r.getMessage()]) == 2
    assert len(app.extensions["cds.answers"]) == 0


def test_kept_answers_are_bounded_least_recently_used_out_first():
    answers = pipeline.Answers(entries=2, json_bytes=10_000, largest=1_000)
    drafted: Any = object()
    keys = [answers.key({"hookInstance": "x", "n": i}, "s") for i in range(3)]
    assert all(k is not None for k in keys)
    k0, k1, k2 = keys
    answers.put(k0, drafted)  # type: ignore[arg-type]
    answers.put(k1, drafted)  # type: ignore[arg-type]
    assert answers.get(k0) is drafted  # k0 used last: k1 goes first
    answers.put(k2, drafted)  # type: ignore[arg-type]
    assert answers.get(k1) is None and answers.get(k0) is drafted and len(answers) == 2
    # The hookInstance is not part of the key; a request too large, or with a NaN, gets none.
    assert answers.key({"hookInstance": "y", "n": 0}, "s") == k0
    # Nor is the FHIR access token: no token is kept after its call.
    token = {"access_token": "secret-token", "token_type": "Bearer"}
    assert answers.key({"hookInstance": "x", "fhirAuthorization": token, "n": 0}, "s") == k0
    assert answers.key({"hookInstance": "x", "text": "a" * 2_000}, "s") is None
    assert answers.key({"hookInstance": "x", "value": float("nan")}, "s") is None
    assert answers.key({"hookInstance": "x", "value": 2**70}, "s") is None


def test_the_key_from_the_bytes_as_sent_leaves_out_only_the_hook_instance():
    def cut(raw: bytes) -> bytes | None:
        return pipeline._raw_without_hook_instance(raw, json.loads(raw))

    assert cut(b'{"hook": "patient-view", "hookInstance" :\n "abc", "x": 1}') == (
        b'{"hook": "patient-view", "hookInstance" :\n , "x": 1}'
    )
    # Two members of the name, or the value written otherwise than orjson would: not by the bytes.
    assert cut(b'{"hookInstance": "abc", "p": {"hookInstance": "abc"}}') is None
    assert cut(b'{"hookInstance": "a\\/c"}') is None
    # Nor with a FHIR access token in them.
    assert cut(b'{"hookInstance": "abc", "fhirAuthorization": {"access_token": "t"}}') is None


def test_requests_that_differ_anywhere_but_the_hook_instance_get_different_keys():
    answers = pipeline.Answers()

    def key(raw: bytes) -> bytes | None:
        return answers.key(json.loads(raw), "s", raw=raw)

    base = key(b'{"hookInstance": "a", "prefetch": {"n": 1}}')
    assert base is not None
    assert key(b'{"hookInstance": "b", "prefetch": {"n": 1}}') == base
    assert key(b'{"hookInstance": "a", "prefetch": {"n": 2}}') != base
    # A decoy member named hookInstance inside the prefetch, the request's own written with an
    # escape: the decoys' values differ, so do the keys.
    decoy_1 = key(b'{"hook\\u0049nstance": "a", "prefetch": {"hookInstance": "x"}}')
    decoy_2 = key(b'{"hook\\u0049nstance": "a", "prefetch": {"hookInstance": "y"}}')
    assert decoy_1 is not None and decoy_2 is not None and decoy_1 != decoy_2


def test_a_request_sent_again_in_other_bytes_gets_the_same_answer(signed_app):
    client = signed_app.test_client()
    body = hook_body(load(demo_files()[0]), "d1e0a3c4-0000-4000-8000-000000000003")
    compact = client.post(SERVICE_URL, data=json.dumps(body), content_type="application/json")
    spaced = client.post(SERVICE_URL, data=json.dumps(body, indent=2), content_type="application/json")
    assert compact.status_code == spaced.status_code == 200
    assert compact.data == spaced.data == _fresh(signed_app, body)

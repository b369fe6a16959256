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
    answers: pipeline.Answers = pipeline.Answers(entries=2, json_bytes=10_000, largest=1_000)
    drafted: Any = object()
    bodies = [{"hookInstance": "x", "hookInstance ": 1, "n": i} for i in range(3)]
    keys = [answers.decoded_key(b, "s") for b in bodies]
    assert all(k is not None for k in keys)
    k0, k1, _ = keys
    for body in bodies[:2]:
        answers.keep(None, None, body, ("s",), drafted)
    assert answers.get_decoded(k0) is drafted  # k0 used last: k1 goes first
    answers.keep(None, None, bodies[2], ("s",), drafted)
    assert answers.get_decoded(k1) is None and answers.get_decoded(k0) is drafted and len(answers) == 2
    # The hookInstance is not part of the key; a request too large, or with a NaN, gets none.
    assert answers.decoded_key({"hookInstance": "y", "hookInstance ": 1, "n": 0}, "s") == k0
    # Nor is the FHIR access token: no token is kept after its call.
    token = {"access_token": "secret-token", "token_type": "Bearer"}
    assert answers.decoded_key({**bodies[0], "fhirAuthorization": token}, "s") == k0
    assert answers.decoded_key({"hookInstance": "x", "text": "a" * 2_000}, "s") is None
    assert answers.decoded_key({"hookInstance": "x", "value": float("nan")}, "s") is None
    assert answers.decoded_key({"hookInstance": "x", "value": 2**70}, "s") is None


def test_the_key_from_the_bytes_as_sent_leaves_out_only_the_hook_instance_and_the_token():
    answers: pipeline.Answers = pipeline.Answers()

    def key(raw: bytes) -> bytes | None:
        cut = answers.cut(raw, "s")
        return None if cut is None else cut.key

    head = b'r["s"]'
    assert key(b'{"hook": "patient-view", "hookInstance" :\n "abc", "x": 1}') == (
        head + b'{"hook": "patient-view", "hookInstance" :\n , "x": 1}'
    )
    token = b'{"access_token": "t}{\\"", "scope": ["a", {"b": "}"}]}'  # braces in strings, nesting
    assert json.loads(token)["access_token"] == 't}{"'
    assert key(b'{"hookInstance": "a\\/c\\u0041", "fhirAuthorization": ' + token + b', "n": 2}') == (
        head + b'{"hookInstance": , "fhirAuthorization": , "n": 2}'
    )
    # Two members of the name, a value neither a string nor an object, JSON cut short: not by bytes.
    assert key(b'{"hookInstance": "abc", "p": {"hookInstance": "abc"}}') is None
    assert key(b'{"hookInstance": 7}') is None
    assert key(b'{"hookInstance": "abc", "fhirAuthorization": null}') is None
    assert key(b'{"hookInstance": "abc", "fhirAuthorization": {"access_token": "t"') is None


def test_requests_that_differ_anywhere_but_the_hook_instance_get_different_keys():
    answers: pipeline.Answers = pipeline.Answers()
    kept: Any = object()

    def keep_and_find(raw: bytes, again: bytes) -> Any:
        answers.clear()
        answers.keep(raw, answers.cut(raw, "s"), json.loads(raw), ("s",), kept)
        cut = answers.cut(again, "s")
        return None if cut is None else answers.find(again, cut)

    base = b'{"hookInstance": "a", "prefetch": {"n": 1}}'
    hit = keep_and_find(base, b'{"hookInstance": "b\\u0041", "prefetch": {"n": 1}}')
    assert (
        hit is not None and hit.kept is kept and hit.hook_instance == "bA" and hit.fhir_authorization is None
    )
    assert keep_and_find(base, b'{"hookInstance": "a", "prefetch": {"n": 2}}') is None
    with_token = b'{"hookInstance": "a", "fhirAuthorization": {"access_token": "t1"}, "p": 1}'
    hit = keep_and_find(
        with_token, b'{"hookInstance": "c", "fhirAuthorization": {"access_token": "t2"}, "p": 1}'
    )
    assert hit is not None and hit.hook_instance == "c" and hit.fhir_authorization == {"access_token": "t2"}
    # A decoy member named hookInstance inside the prefetch, the request's own written with an
    # escape: the bytes would be cut at the decoy, so such a request is never kept.
    decoy = b'{"hook\\u0049nstance": "a", "prefetch": {"hookInstance": "x"}}'
    assert keep_and_find(decoy, decoy.replace(b'"x"', b'"y"')) is None and len(answers) == 0
    # Nor one whose own member is given twice (the last one counts when parsed).
    twice = b'{"hookInstance": "a", "p": 1, "hook\\u0049nstance": "b"}'
    assert keep_and_find(twice, twice) is None and len(answers) == 0


def test_a_chart_sent_again_is_answered_from_its_bytes_without_parsing_them(
    signed_app, evaluations, monkeypatch
):
    from cds_service.web import app as web_app

    parsed: list[int] = []
    real = web_app._parsed
    monkeypatch.setattr(web_app, "_parsed", lambda raw: (parsed.append(1), real(raw))[1])
    client = signed_app.test_client()
    bundle = load(demo_files()[0])
    token = {
        "access_token": "first-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
    }
    first = {**hook_body(bundle, "d1e0a3c4-0000-4000-8000-000000000011"), "fhirAuthorization": token}
    assert client.post(SERVICE_URL, json=first).status_code == 200
    again = {**first, "hookInstance": "d1e0a3c4-0000-4000-8000-000000000012"}
    again["fhirAuthorization"] = {**token, "access_token": "another-token-of-another-length"}
    resp = client.post(SERVICE_URL, json=again)
    assert len(parsed) == 1 and len(evaluations) == 1  # the second call parsed and evaluated nothing
    assert resp.status_code == 200 and resp.data == _fresh(signed_app, again)
    del evaluations[:]
    # Values a request may not hold are refused as if the chart had never been seen.
    for bad in (
        {"hookInstance": "x" * 65},
        {"hookInstance": "bell\a"},
        {"fhirAuthorization": {"scope": "s"}},
    ):
        resp = client.post(SERVICE_URL, json={**again, **bad})
        assert resp.status_code == 400 and resp.mimetype == "application/fhir+json", bad
    assert evaluations == []


def test_a_request_sent_again_in_other_bytes_gets_the_same_answer(signed_app):
    client = signed_app.test_client()
    body = hook_body(load(demo_files()[0]), "d1e0a3c4-0000-4000-8000-000000000003")
    compact = client.post(SERVICE_URL, data=json.dumps(body), content_type="application/json")
    spaced = client.post(SERVICE_URL, data=json.dumps(body, indent=2), content_type="application/json")
    assert compact.status_code == spaced.status_code == 200
    assert compact.data == spaced.data == _fresh(signed_app, body)


def test_a_call_cuts_its_bytes_once_whether_or_not_its_answer_was_kept(signed_app, monkeypatch):
    from cds_service import kept_answers

    cuts: list[int] = []
    real = kept_answers._cut
    monkeypatch.setattr(kept_answers, "_cut", lambda *a: (cuts.append(1), real(*a))[1])
    client = signed_app.test_client()
    body = hook_body(load(demo_files()[0]), "d1e0a3c4-0000-4000-8000-000000000021")
    for hook_instance in ("d1e0a3c4-0000-4000-8000-000000000021", "d1e0a3c4-0000-4000-8000-000000000022"):
        assert client.post(SERVICE_URL, json={**body, "hookInstance": hook_instance}).status_code == 200
    assert len(cuts) == 2  # the first call evaluated and kept, the second found: one cut each

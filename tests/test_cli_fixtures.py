"""`cds-service fixtures export | load` and the demo's recent dates: Bundles checked with
fhir.resources, loading against a real HTTP FHIR server (pytest-httpserver)."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
from fhir.resources.R4B.bundle import Bundle
from werkzeug import Request, Response

from cds_service.cli import fixtures, server
from cds_service.cli.commands import request_from_bundle
from cds_service.cli.common import CliError
from cds_service.cli.main import _parser
from cds_service.hooks.catalogue import services
from cds_service.pipeline import answer
from cds_service.settings import Settings

TODAY = dt.date(2027, 5, 20)


def _refs(value):
    if isinstance(value, dict):
        if isinstance(value.get("reference"), str):
            yield value["reference"]
        for v in value.values():
            yield from _refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)


def test_export_writes_valid_r4_transactions_the_server_assigns_ids_in(tmp_path, capsys):
    assert fixtures.export(_parser().parse_args(["fixtures", "export", str(tmp_path)]), Settings()) == 0
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == len(fixtures.demo_files()) >= 30
    assert f"{len(files)} transaction Bundles" in capsys.readouterr().out
    for path in files:
        doc = json.loads(path.read_text())
        Bundle.model_validate(doc)  # raises on anything R4B refuses
        assert doc["type"] == "transaction"
        urls = {e["fullUrl"] for e in doc["entry"]}
        assert all(u.startswith("urn:uuid:") for u in urls) and len(urls) == len(doc["entry"])
        assert all(
            e["request"] == {"method": "POST", "url": e["resource"]["resourceType"]} for e in doc["entry"]
        )
        assert not any("id" in e["resource"] for e in doc["entry"])
        assert set(_refs(doc)) <= urls, path.name  # every reference is to an entry of the transaction
        assert sum(e["resource"]["resourceType"] == "Patient" for e in doc["entry"]) == 1


def _answers(bundle, today):
    service = next(iter(services().values()))
    cards = answer(request_from_bundle(bundle), service, Settings(auth_required=False), today).answer["cards"]
    return cards


def test_shifted_dates_keep_every_story_and_stale_cea_only_where_the_story_has_one():
    stale = []
    for path in fixtures.demo_files():
        bundle = json.loads(path.read_text())
        shifted = fixtures.shift_dates(json.loads(path.read_text()), TODAY)
        latest = max(dt.date.fromisoformat(d) for d in re.findall(r'"(\d{4}-\d{2}-\d{2})', path.read_text()))
        # Evaluated today, the shifted chart says what the original says a week after its last event.
        as_written = _answers(bundle, latest + dt.timedelta(days=fixtures.RECENT_DAYS))
        now = _answers(shifted, TODAY)
        assert [
            (c["indicator"], c["extension"]["crc-cds-assessment"].get("recommendation")) for c in now
        ] == [
            (c["indicator"], c["extension"]["crc-cds-assessment"].get("recommendation")) for c in as_written
        ], path.name
        if any("days old" in c["detail"] for c in now):
            stale.append(path.name)
    # Only the chart whose CEA predates its latest event (a planned ablation) by over 90 days.
    assert stale == ["26-lung-ablation-planned.json"]
    assert fixtures.shift_dates({"resourceType": "Bundle"}, TODAY) == {"resourceType": "Bundle"}


def test_the_demo_serves_shifted_dates_and_evaluate_files_do_not(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(server, "create_served_app", lambda settings, **kw: seen.update(kw))
    monkeypatch.setattr(server, "run_gunicorn", lambda *a, **kw: None)
    server.demo(_parser().parse_args(["demo", "--port", "1"]), Settings())
    today = dt.datetime.now(dt.UTC).date()
    dates = [
        dt.date.fromisoformat(m)
        for m in re.findall(r'"(\d{4}-\d{2}-\d{2})', json.dumps(seen["demo_resources"]))
        if not m.startswith(("19", "18"))  # birth dates stay decades back
    ]
    assert max(dates) == today - dt.timedelta(days=fixtures.RECENT_DAYS)
    assert fixtures.demo_resources() != seen["demo_resources"]  # as the files hold them


# --- load, against a FHIR server over real HTTP ---------------------------------------------------------


class FakeServer:
    """Answers transactions with a transaction-response; scripted 429s and a refusal."""

    def __init__(self, script: dict[int, Response] | None = None) -> None:
        self.script = script or {}
        self.posts: list[dict] = []
        self.auth: list[str | None] = []

    def __call__(self, request: Request) -> Response:
        self.auth.append(request.headers.get("Authorization"))
        scripted = self.script.pop(len(self.auth), None)
        if scripted is not None:
            return scripted
        bundle = json.loads(request.get_data())
        self.posts.append(bundle)
        entries = []
        for i, entry in enumerate(bundle["entry"]):
            rtype = entry["resource"]["resourceType"]
            entries.append(
                {
                    "response": {
                        "status": "201 Created",
                        "location": f"{rtype}/{len(self.posts)}{i}/_history/1",
                    }
                }
            )
        body = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
        return Response(json.dumps(body), 200, content_type="application/fhir+json")


def _load(base: str, *extra: str, settings: Settings | None = None) -> int:
    args = _parser().parse_args(["fixtures", "load", base, *extra])
    return fixtures.load(args, settings or Settings())


def test_load_posts_one_transaction_per_patient_and_waits_out_a_429(httpserver, capsys):
    fake = FakeServer({1: Response("slow down", 429, headers={"Retry-After": "0"})})
    httpserver.expect_request("/fhir", method="POST").respond_with_handler(fake)
    assert _load(httpserver.url_for("/fhir"), "--token", "tok-1") == 0
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    names = [p.name for p in fixtures.demo_files()]
    assert [line[0] for line in lines] == names and len(fake.posts) == len(names)
    assert len(fake.auth) == len(names) + 1 and set(fake.auth) == {"Bearer tok-1"}
    assert all(b["type"] == "transaction" for b in fake.posts)
    # The patient's id on the server, from the transaction-response's location.
    assert lines[0][1] == "Patient/10" and "Sigmoid cancer" in lines[0][2]
    assert f"{len(names)} demo patients loaded" in err and "1 rate-limited answer(s) waited out" in err


def test_load_stops_at_a_refusal_with_its_reason(httpserver, capsys):
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "processing", "diagnostics": "Reference\x1b[31m not allowed"}
        ],
    }
    fake = FakeServer({3: Response(json.dumps(outcome), 422, content_type="application/fhir+json")})
    httpserver.expect_request("/fhir", method="POST").respond_with_handler(fake)
    with pytest.raises(CliError) as refused:
        _load(httpserver.url_for("/fhir"))
    message = str(refused.value)
    assert message.startswith(fixtures.demo_files()[2].name)
    assert (
        "refused the transaction: HTTP 422: Reference [31m not allowed" in message and "\x1b" not in message
    )
    assert "(2 patient(s) loaded before it)" in message
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize(
    "base,settings,reason",
    [
        ("http://fhir.example.org/r4", {}, "plain http"),
        (
            "https://fhir.example.org/r4",
            {"fhir_server_allowlist": ["https://other.example/fhir"]},
            "ALLOWLIST",
        ),
        ("http://169.254.169.254/fhir", {"allow_insecure_fhir": True}, "metadata"),
        ("ftp://fhir.example.org/", {}, "not an http"),
    ],
)
def test_load_keeps_the_fhir_server_rules(base, settings, reason):
    with pytest.raises(CliError, match=reason):
        _load(base, settings=Settings(**settings))

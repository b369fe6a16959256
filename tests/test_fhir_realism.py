"""What real EHR FHIR servers do, end to end through the hook endpoint: optional types refused,
required ones refused, small pages, rate limits, unknown patients, ids that are not FHIR ids.

The FHIR server is the demo's read-only endpoint over the demo patients on a loopback port, with
per-test quirks applied in front of it (status codes, delays, 429s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response, request
from werkzeug.serving import make_server

from cds_service.cli.fixtures import demo_resources
from cds_service.fetch.prefetch import resolve_chart
from cds_service.hooks.catalogue import services
from cds_service.hooks.models import parse_hook_request
from cds_service.settings import Settings
from cds_service.web.demo_fhir import create_fhir_blueprint

from .conftest import FIXTURES, SERVICE_URL, hook_body, load

# 01-lung-high-risk-all-four: a lung card, and no optional data in its chart.
CHART = FIXTURES / "01-lung-high-risk-all-four.json"
OPTIONAL = {
    "bodystructures": "BodyStructure",
    "medicationrequests": "MedicationRequest",
    "medicationadministrations": "MedicationAdministration",
    "medicationstatements": "MedicationStatement",
    "servicerequests": "ServiceRequest",
}
MARKER = "UPSTREAM-SECRET-7f3a"  # text the FHIR server writes; it must never reach the EHR


class Quirks:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.refuse: dict[str, int] = {}  # resource type -> status (200: an OperationOutcome)
        self.rate_limit: dict[str, str] = {}  # header -> value, on each first request of a URL
        self.delay_s = 0.0
        self.log: list[dict[str, Any]] = []
        self._limited: set[str] = set()


@pytest.fixture(scope="module")
def quirky() -> Iterator[tuple[str, Quirks]]:
    quirks = Quirks()
    app = Flask("quirky-fhir")
    app.register_blueprint(create_fhir_blueprint(demo_resources(), "/fhir"))

    @app.before_request
    def quirk() -> Response | None:
        rtype = request.path.removeprefix("/fhir/").split("/", 1)[0]
        quirks.log.append(
            {
                "t": time.monotonic(),
                "path": request.path,
                "args": request.args.to_dict(flat=False),
                "url": request.full_path,
            }
        )
        if quirks.delay_s:
            time.sleep(quirks.delay_s)
        if quirks.rate_limit and request.full_path not in quirks._limited:
            quirks._limited.add(request.full_path)
            return Response("slow down", status=429, headers=quirks.rate_limit)
        status = quirks.refuse.get(rtype)
        if status is not None:
            outcome = (
                '{"resourceType": "OperationOutcome", "issue": [{"severity": "error", '
                f'"code": "forbidden", "diagnostics": "{MARKER}"}}]}}'
            )
            return Response(outcome, status=status, content_type="application/fhir+json")
        return None

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/fhir", quirks
    server.shutdown()


@pytest.fixture
def fhir(quirky: tuple[str, Quirks]) -> Iterator[tuple[str, Quirks]]:
    quirky[1].reset()
    yield quirky
    quirky[1].reset()


def _body(
    base: str, *, prefetch: dict[str, Any] | None = None, patient_id: str | None = None
) -> dict[str, Any]:
    body = hook_body(load(CHART))
    if patient_id is not None:
        body["context"]["patientId"] = patient_id
    body["prefetch"] = prefetch or {}
    body["fhirServer"] = base
    body["fhirAuthorization"] = {
        "access_token": "tok-realism",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "test",
    }
    return body


def _lung(resp: Any) -> dict[str, Any]:
    (card,) = [
        c
        for c in resp.get_json()["cards"]
        if c["extension"]["crc-cds-assessment"]["model"] == "cai-2025-lung"
    ]
    return card


def _brief(card: dict[str, Any]) -> tuple[Any, ...]:
    a = card["extension"]["crc-cds-assessment"]
    return a["recommendation"], a["score"], a["group"], [f["status"] for f in a["factors"]]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 501, 200])
def test_optional_searches_refused_still_answer_and_say_what_is_missing(client, fhir, status):
    base, quirks = fhir
    reference = client.post(SERVICE_URL, json=_body(base))
    assert (
        reference.status_code == 200
        and "unavailable" not in _lung(reference)["extension"]["crc-cds-assessment"]
    )
    quirks.refuse = dict.fromkeys(OPTIONAL.values(), status)
    resp = client.post(SERVICE_URL, json=_body(base))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    card = _lung(resp)
    assert _brief(card) == _brief(_lung(reference))
    unavailable = card["extension"]["crc-cds-assessment"]["unavailable"]
    assert [u["search"] for u in unavailable] == list(OPTIONAL)  # the service's order
    reason = f"HTTP {status}" if status != 200 else "refused (OperationOutcome)"
    assert {u["reason"] for u in unavailable} == {reason}
    assert "Could not be read from the EHR's FHIR server" in card["detail"]
    assert "drawn during systemic therapy" in card["detail"]  # the on-treatment CEA rule unchecked
    assert MARKER not in resp.get_data(as_text=True)


def test_prefetch_key_holding_an_operation_outcome_refused_again_is_unavailable(client, fhir):
    base, quirks = fhir
    quirks.refuse = {"BodyStructure": 403, "ServiceRequest": 403}
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "forbidden"}]}
    full = hook_body(load(CHART))["prefetch"]
    prefetch = {**full, "bodystructures": outcome, "servicerequests": outcome}
    resp = client.post(SERVICE_URL, json=_body(base, prefetch=prefetch))
    assert resp.status_code == 200
    unavailable = _lung(resp)["extension"]["crc-cds-assessment"]["unavailable"]
    assert unavailable == [
        {"search": "bodystructures", "reason": "HTTP 403"},
        {"search": "servicerequests", "reason": "HTTP 403"},
    ]
    # Only the two keys the EHR could not prefetch were asked for; no medication line this time.
    assert {e["path"] for e in quirks.log} == {"/fhir/BodyStructure", "/fhir/ServiceRequest"}
    assert "drawn during systemic therapy" not in _lung(resp)["detail"]


def test_required_searches_refused_are_a_412_naming_each_in_a_stable_order(client, fhir):
    base, quirks = fhir
    quirks.refuse = {"Observation": 403, "Procedure": 403, "BodyStructure": 403}
    messages = []
    for _ in range(3):
        resp = client.post(SERVICE_URL, json=_body(base))
        assert resp.status_code == 412
        messages.append(resp.get_json()["issue"][0]["diagnostics"])
    assert len(set(messages)) == 1
    message = messages[0]
    assert message.index("'observations' (Observation): HTTP 403") < message.index(
        "'procedures' (Procedure): HTTP 403"
    )
    assert "bodystructures" not in message and MARKER not in message and "tok-realism" not in message


def test_own_searches_ask_for_large_pages(client, fhir):
    base, quirks = fhir
    assert client.post(SERVICE_URL, json=_body(base)).status_code == 200
    searches = [e for e in quirks.log if e["path"].count("/") == 2]
    assert len(searches) == 8
    assert all(int(e["args"]["_count"][0]) >= 200 for e in searches)


def test_429_with_ratelimit_reset_is_retried_after_the_reset(client, fhir):
    base, quirks = fhir
    quirks.rate_limit = {"RateLimit-Reset": "1", "RateLimit": "limit=100, remaining=0, reset=1"}
    started = time.monotonic()
    resp = client.post(SERVICE_URL, json=_body(base))
    assert resp.status_code == 200 and time.monotonic() - started < 3
    first_seen: dict[str, float] = {}
    gaps = []
    for e in quirks.log:
        if e["url"] in first_seen:
            gaps.append(e["t"] - first_seen[e["url"]])
        first_seen.setdefault(e["url"], e["t"])
    assert gaps and min(gaps) >= 0.9


def test_429_asking_for_longer_than_the_budget_is_a_412_saying_rate_limited(client, fhir):
    base, quirks = fhir
    quirks.rate_limit = {"RateLimit-Reset": "30"}
    started = time.monotonic()
    resp = client.post(SERVICE_URL, json=_body(base))
    assert resp.status_code == 412 and time.monotonic() - started < 1
    assert "rate-limited" in resp.get_json()["issue"][0]["diagnostics"]


def test_unknown_patient_is_a_412_patient_not_found(client, fhir):
    base, _ = fhir
    resp = client.post(SERVICE_URL, json=_body(base, patient_id="nobody-here"))
    assert resp.status_code == 412
    issue = resp.get_json()["issue"][0]
    assert issue["code"] == "not-found" and issue["diagnostics"].startswith("patient not found")


@pytest.mark.parametrize("patient_id", ["../metadata", "x&code=1", "a,b", "p" * 65, "", "a b", "é"])
def test_a_patient_id_that_is_not_a_fhir_id_is_a_400_and_never_sent(client, fhir, patient_id):
    base, quirks = fhir
    resp = client.post(SERVICE_URL, json=_body(base, patient_id=patient_id))
    assert resp.status_code == 400 and resp.get_json()["resourceType"] == "OperationOutcome"
    assert quirks.log == []


def test_a_call_that_completed_a_paged_prefetch_is_audited_as_partial_prefetch(fhir):
    import requests

    base, _ = fhir
    body = hook_body(load(CHART))
    pid = body["context"]["patientId"]
    body["fhirServer"] = base
    body["prefetch"]["conditions"] = requests.get(
        f"{base}/Condition?patient={pid}&_count=1", timeout=5
    ).json()
    service = services()["crc-metastases"]
    _, source = resolve_chart(
        parse_hook_request(body, "patient-view"), service, Settings(auth_required=False)
    )
    assert source.fhir_mode == "partial-prefetch" and "conditions" in source.fetched

"""FHIR mode end to end: no prefetch, the service reads a real FHIR server over HTTP.

The FHIR server is the demo's own read-only endpoint (cds_service.web.demo_fhir) over the demo
patients, served by werkzeug on a loopback port, so paging and search are real HTTP.
"""

from __future__ import annotations

import threading
import time

import pytest
from flask import Flask, request
from werkzeug.serving import make_server

from cds_service.cli.fixtures import demo_resources
from cds_service.web.demo_fhir import create_fhir_blueprint

from .conftest import SERVICE_URL, demo_files, hook_body, load


@pytest.fixture(scope="module")
def fhir_server():
    app = Flask("fhir")
    app.register_blueprint(create_fhir_blueprint(demo_resources(), "/fhir"))
    seen: list[dict] = []

    @app.before_request
    def record() -> None:
        seen.append({"path": request.full_path, "auth": request.headers.get("Authorization")})

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/fhir", seen
    server.shutdown()


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "uuid"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _fhir_body(path, base: str, token: str) -> dict:
    body = hook_body(load(path))
    body.pop("prefetch")
    body["fhirServer"] = base
    body["fhirAuthorization"] = {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "test",
    }
    return body


@pytest.mark.parametrize("path", demo_files(), ids=lambda p: p.stem)
def test_fhir_mode_gives_the_same_cards_as_prefetch(client, fhir_server, path):
    base, seen = fhir_server
    prefetch = client.post(SERVICE_URL, json=hook_body(load(path)))
    mark = len(seen)
    fetched = client.post(SERVICE_URL, json=_fhir_body(path, base, "tok-123"))
    assert fetched.status_code == 200, fetched.get_data(as_text=True)
    assert _strip(fetched.get_json()) == _strip(prefetch.get_json())
    calls = seen[mark:]
    assert calls and all(c["auth"] == "Bearer tok-123" for c in calls)


def test_a_chart_read_from_the_fhir_server_is_read_again_on_every_call(client, app, fhir_server):
    """Only an answer made from the request alone is kept: the FHIR server's data may have changed."""
    base, seen = fhir_server
    body = _fhir_body(demo_files()[0], base, "tok-again")
    for _ in range(2):
        mark = len(seen)
        resp = client.post(SERVICE_URL, json=body)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert len(seen) > mark
    assert len(app.extensions["cds.answers"]) == 0


def test_partial_prefetch_fetches_only_the_missing_keys(client, fhir_server):
    base, seen = fhir_server
    path = demo_files()[0]
    full = hook_body(load(path))
    body = _fhir_body(path, base, "tok-partial")
    body["prefetch"] = {k: v for k, v in full["prefetch"].items() if k != "observations"}
    mark = len(seen)
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code == 200
    assert _strip(resp.get_json()) == _strip(client.post(SERVICE_URL, json=full).get_json())
    paths = [c["path"] for c in seen[mark:]]
    assert paths and all(p.startswith("/fhir/Observation") for p in paths)


def test_first_page_only_prefetch_is_completed_by_following_next_links(client, fhir_server, monkeypatch):
    import requests

    base, seen = fhir_server
    path = demo_files()[0]
    full = hook_body(load(path))
    pid = full["context"]["patientId"]
    body = _fhir_body(path, base, "tok-pages")
    body["prefetch"] = {"patient": full["prefetch"]["patient"]}
    for key, rtype in (
        ("conditions", "Condition"),
        ("procedures", "Procedure"),
        ("observations", "Observation"),
    ):
        first = requests.get(f"{base}/{rtype}?patient={pid}&_count=1", timeout=5).json()
        assert (
            any(link["relation"] == "next" for link in first.get("link", []))
            or len(first.get("entry", [])) <= 1
        )
        body["prefetch"][key] = first
    mark = len(seen)
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code == 200
    assert _strip(resp.get_json()) == _strip(client.post(SERVICE_URL, json=full).get_json())
    assert all(c["auth"] == "Bearer tok-pages" for c in seen[mark:])


@pytest.mark.parametrize(
    "base,label",
    [
        ("http://127.0.0.1:9/fhir", "connection refused"),
        ("http://192.0.2.10/fhir", "http to a non-loopback host"),
        ("ftp://127.0.0.1/fhir", "not http(s)"),
    ],
)
def test_unreachable_or_unsafe_fhir_server_is_412_without_the_token(client, base, label):
    body = _fhir_body(demo_files()[0], base, "secret-token-xyz")
    started = time.monotonic()
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code in (412, 400), label
    assert resp.get_json()["resourceType"] == "OperationOutcome"
    assert "secret-token-xyz" not in resp.get_data(as_text=True)
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_evaluate_against_a_fhir_server_prints_cards_and_what_was_fetched(fhir_server, tmp_path):
    import json
    import os
    import subprocess
    import sys

    base, seen = fhir_server
    path = demo_files()[0]
    pid = load(path)["entry"][0]["resource"]["id"]
    mark = len(seen)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cds_service.cli",
            "evaluate",
            "--fhir-server",
            base,
            "--patient",
            pid,
            "--token",
            "tok-cli",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "CDS_AUTH_REQUIRED": "false"},
    )
    assert proc.returncode == 0, proc.stderr
    cards = json.loads(proc.stdout)["cards"]
    assert len(cards) == 1 and cards[0]["extension"]["crc-cds-assessment"]["model"] == "cai-2025-lung"
    assert "conditions" in proc.stderr and "resource(s)" in proc.stderr
    assert "tok-cli" not in proc.stderr + proc.stdout
    assert all(c["auth"] == "Bearer tok-cli" for c in seen[mark:])


@pytest.mark.slow
def test_evaluate_against_a_closed_port_exits_2_with_the_report_and_one_reason(tmp_path):
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cds_service.cli",
            "evaluate",
            "--fhir-server",
            "http://127.0.0.1:9/fhir",
            "--patient",
            "x",
            "--token",
            "secret-t",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=dict(os.environ),
    )
    # The per-search account first (what a developer needs to see which search failed), then
    # the reason on the last line; no traceback, no token.
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "secret-t" not in proc.stderr and "Traceback" not in proc.stderr
    assert lines[0].startswith("fetched from") and "connection failed" in lines[-1]
    assert any(ln.split()[0] == "observations" and ln.endswith("connection failed") for ln in lines[1:-1])


# --- Medications an EHR left out of the prefetch (it may ignore `_include`) ------------------------


def _chart_on_folfox() -> dict:
    """A lung-metastasis chart whose chemotherapy order names its drug only through a Medication."""
    from .builders import cea, crc, lung_met, medication_request, n_category, patient, resection

    order = medication_request(authored="2021-02-01", id="folfox-order")
    del order["medicationCodeableConcept"]
    order["medicationReference"] = {"reference": "Medication/folfox"}
    resources = [
        patient(),
        crc(),
        resection(),
        n_category("pathologic", "1229951001"),
        lung_met(onset="2021-01-10"),
        cea(12, date="2021-01-20", id="before"),
        cea(3, date="2021-05-01", id="on-treatment"),
        order,
    ]
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


FOLFOX = {
    "resourceType": "Medication",
    "id": "folfox",
    "code": {"text": "FOLFOX"},
    "ingredient": [
        {
            "itemCodeableConcept": {
                "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "32592"}]
            }
        }
    ],
}


def _lung_assessment(resp) -> dict:
    (card,) = [
        c
        for c in resp.get_json()["cards"]
        if c["extension"]["crc-cds-assessment"]["model"] == "cai-2025-lung"
    ]
    return card["extension"]["crc-cds-assessment"]


def test_a_medication_missing_from_the_prefetch_is_read_from_the_fhir_server(client, httpserver):
    httpserver.expect_request("/fhir/Medication/folfox").respond_with_json(FOLFOX)
    body = hook_body(_chart_on_folfox())
    body["fhirServer"] = httpserver.url_for("/fhir")
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code == 200
    a = _lung_assessment(resp)
    # The order is oxaliplatin, started after the metastasis: NAT under way, and the CEA from before it.
    assert a["recommendation"] == "assess-nat-response"
    cea = next(f for f in a["factors"] if f["id"] == "cea_gt_5")
    assert cea["status"] == "present" and cea["sources"] == ["Observation/before"]
    assert len(httpserver.log) == 1


def test_a_medication_the_fhir_server_does_not_know_leaves_the_order_unnamed(client, httpserver):
    httpserver.expect_request("/fhir/Medication/folfox").respond_with_json(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]},
        status=404,
    )
    body = hook_body(_chart_on_folfox())
    body["fhirServer"] = httpserver.url_for("/fhir")
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code == 200
    assert _lung_assessment(resp)["recommendation"] != "assess-nat-response"


def test_no_medication_read_without_a_fhir_server_or_when_the_prefetch_holds_it(client, httpserver):
    bundle = _chart_on_folfox()
    without_server = client.post(SERVICE_URL, json=hook_body(bundle))
    assert without_server.status_code == 200
    bundle["entry"].append({"resource": FOLFOX})
    body = hook_body(bundle)
    body["fhirServer"] = httpserver.url_for("/fhir")
    resp = client.post(SERVICE_URL, json=body)
    assert _lung_assessment(resp)["recommendation"] == "assess-nat-response"
    assert httpserver.log == []


def test_a_failing_medication_read_is_412_like_any_fetch(client, httpserver):
    # Without the drug the CEA rule could pick an on-treatment value (§8.4): no guessing.
    httpserver.expect_request("/fhir/Medication/folfox").respond_with_data("down", status=500)
    body = hook_body(_chart_on_folfox())
    body["fhirServer"] = httpserver.url_for("/fhir")
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code == 412
    assert resp.get_json()["resourceType"] == "OperationOutcome"

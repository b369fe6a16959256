"""Operations: request ids, JSON logs without PHI or tokens, Prometheus metrics (one process and
several gunicorn workers), configuration errors at start."""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cds_service.telemetry.logs import JsonFormatter, accepted_request_id

from .conftest import FIXTURES, SERVICE_URL, hook_body, load
from .test_cli import _start, _stop

HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text).get((name, frozenset(labels.items())), 0.0)


def test_request_id_is_echoed_when_safe_and_made_up_otherwise(client):
    assert client.get("/healthz", headers={"X-Request-Id": "lb-42.a"}).headers["X-Request-Id"] == "lb-42.a"
    made_up = client.get("/healthz", headers={"X-Request-Id": "bad id <script>"}).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made_up)
    assert accepted_request_id("x" * 65) is None and accepted_request_id(None) is None


def test_metrics_count_requests_cards_and_feedback(client):
    before = client.get("/metrics").get_data(as_text=True)
    card = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK))).get_json()["cards"][0]
    client.post(SERVICE_URL, json={"hook": "patient-view"})
    client.post(f"{SERVICE_URL}/feedback", json={"card": card["uuid"], "outcome": "overridden"})
    client.post("/cds-services/nope", json={})
    assert client.application.extensions["cds.audit"].flush()  # feedback is counted as it is stored
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    after = resp.get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    svc = "crc-metastases"
    assert delta("cds_http_requests_total", service=svc, endpoint="hook", status="200") == 1
    assert delta("cds_http_requests_total", service=svc, endpoint="hook", status="400") == 1
    assert delta("cds_http_requests_total", service=svc, endpoint="feedback", status="200") == 1
    assert (
        delta("cds_http_requests_total", service="-", endpoint="hook", status="404") == 1
    )  # no label from the URL
    assert delta("cds_http_request_duration_seconds_count", service=svc, endpoint="hook") == 2
    assessment = card["extension"]["crc-cds-assessment"]
    assert (
        delta(
            "cds_cards_total",
            service=svc,
            model=assessment["model"],
            recommendation=assessment["recommendation"],
        )
        == 1
    )
    assert delta("cds_feedback_total", service=svc, outcome="overridden") == 1


def test_logs_carry_the_request_id_and_no_patient_id_or_token(client, caplog):
    body = hook_body(load(HIGH_RISK))
    body["context"]["patientId"] = body["prefetch"]["patient"]["id"]
    body["fhirAuthorization"] = {
        "access_token": "secret-token-value",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "cds",
    }
    with caplog.at_level(logging.DEBUG):
        resp = client.post(SERVICE_URL, json=body, headers={"X-Request-Id": "req-1"})
        card = resp.get_json()["cards"][0]
        client.post(
            f"{SERVICE_URL}/feedback",
            headers={"X-Request-Id": "req-2"},
            json={
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"userComment": "free text"},
            },
        )
    # caplog's records were made in the request's context; format them as the service does.
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name.startswith("cds_service")]
    docs = [json.loads(line) for line in lines]
    access = [d for d in docs if d["logger"] == "cds_service.access"]
    assert {d["route"] for d in access} == {
        "/cds-services/<service_id>",
        "/cds-services/<service_id>/feedback",
    }
    assert all(d["status"] == 200 and "duration_ms" in d for d in access)
    text = "\n".join(lines)
    assert (
        body["context"]["patientId"] not in text
        and "secret-token-value" not in text
        and "free text" not in text
    )


def test_a_hook_call_logs_one_line_that_says_what_it_answered(client, caplog):
    with caplog.at_level(logging.INFO):
        resp = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK)))
    assert resp.status_code == 200
    cards = resp.get_json()["cards"]
    lines = [r for r in caplog.records if r.name.startswith("cds_service") and r.levelno == logging.INFO]
    (line,) = lines  # a log line costs about as much as answering a chart sent again: one per call
    doc = json.loads(JsonFormatter().format(line))
    assert doc["logger"] == "cds_service.access" and doc["route"] == "/cds-services/<service_id>"
    assert doc["card_count"] == len(cards) >= 1 and doc["status"] == 200
    assert doc["recommendations"] == ",".join(
        c["extension"]["crc-cds-assessment"]["recommendation"] for c in cards
    )
    assert doc["chart_resources"] > 0 and doc["fhir_mode"] and doc["evaluate_ms"] >= 0
    assert f"{len(cards)} card(s)" in doc["message"]


def test_json_formatter_adds_request_id_extra_fields_and_exceptions():
    from cds_service.telemetry.logs import REQUEST_ID

    token = REQUEST_ID.set("rid-7")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            record = logging.LogRecord(
                "x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info()
            )
        record.status = 500
        doc = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert doc["message"] == "failed here" and doc["request_id"] == "rid-7" and doc["status"] == 500
    assert "ValueError: boom" in doc["exception"] and doc["level"] == "ERROR"


def test_json_formatter_writes_what_orjson_cannot():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "odd \u2028 %s", ("\ud800",), None)
    record.big = 10**30  # beyond 64 bits: the standard library writes it
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\u2028" not in line
    doc = json.loads(line)
    assert doc["big"] == 10**30 and doc["message"] == "odd \u2028 \ud800"


# --- the production server: two workers, one set of metrics, JSON logs -----------------------------------


@pytest.mark.slow
def test_serve_with_two_workers_sums_metrics_and_audits_every_call(tmp_path):
    db = tmp_path / "cds.db"
    env = {
        "CDS_AUTH_REQUIRED": "false",
        "CDS_DATABASE_URL": f"sqlite:///{db}",
        "CDS_AUDIT_KEY": "k" * 32,
        # Workers are recycled during the test: a dead worker's counts must stay in the sum.
        "GUNICORN_CMD_ARGS": "--max-requests 10",
    }
    proc, base = _start(["serve", "--workers", "2", "--threads", "2"], env, tmp_path)
    calls = 12
    try:
        with requests.Session() as http:
            for _ in range(calls):
                card = http.post(f"{base}{SERVICE_URL}", json=hook_body(load(HIGH_RISK)), timeout=10).json()[
                    "cards"
                ][0]
                fb = http.post(
                    f"{base}{SERVICE_URL}/feedback",
                    timeout=10,
                    json={
                        "card": card["uuid"],
                        "outcome": "accepted",
                        "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                    },
                )
                assert fb.status_code == 200, fb.text
            # Feedback is counted as it is stored, a fraction of a second behind its 200.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                text = http.get(f"{base}/metrics", timeout=10).text
                if _value(text, "cds_feedback_total", service="crc-metastases", outcome="accepted") == calls:
                    break
                time.sleep(0.1)
            # Each scrape may land on either worker; both must report the sum of all workers.
            scrapes = [http.get(f"{base}/metrics", timeout=10).text for _ in range(4)]
    finally:
        log = _stop(proc)
    for text in scrapes:
        assert (
            _value(text, "cds_http_requests_total", service="crc-metastases", endpoint="hook", status="200")
            == calls
        )
        assert _value(text, "cds_feedback_total", service="crc-metastases", outcome="accepted") == calls
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM hook_call").fetchone()[0] == calls
        assert conn.execute("SELECT count(*) FROM feedback").fetchone()[0] == calls
    docs = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert sum("Autorestarting worker" in d["message"] for d in docs) >= 2
    assert any(d["logger"] == "gunicorn.error" for d in docs)
    assert sum(bool(d["logger"] == "cds_service.access" and d.get("request_id")) for d in docs) >= 2 * calls
    assert "Traceback" not in log


@pytest.mark.slow
def test_serve_refuses_a_bad_configuration_with_one_line(tmp_path):
    env = {
        **os.environ,
        "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'missing' / 'cds.db'}",
        "CDS_PUBLIC_BASE_URL": "https://cds.example.org",  # auth is on: serve needs it to start
    }
    proc = subprocess.run(
        [sys.executable, "-m", "cds_service.cli", "serve", "--port", "9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    env["CDS_AUDIT_KEY"] = "too short"
    proc = subprocess.run(
        [sys.executable, "-m", "cds_service.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "CDS_AUDIT_KEY must be at least 32 characters" in proc.stderr


@pytest.mark.parametrize("fmt,json_lines", [("json", True), ("text", False), (" JSON ", True)])
def test_log_format_setting(monkeypatch, fmt, json_lines):
    # CDS_LOG_FORMAT is a Settings field (validated with the rest), read per command.
    from cds_service.settings import Settings

    monkeypatch.setenv("CDS_LOG_FORMAT", fmt)
    assert Settings().json_logs_for("evaluate") is json_lines
    monkeypatch.delenv("CDS_LOG_FORMAT")
    assert Settings().json_logs_for("serve") is True and Settings().json_logs_for("report") is False


def test_a_metrics_failure_never_costs_an_answer(caplog):
    from cds_service.telemetry import metrics

    metrics.observe_request("crc-metastases", "hook", 200, "not a number")  # a real TypeError inside
    assert any("metrics not updated (observe_request)" in r.getMessage() for r in caplog.records)

"""Hostile request content: bounded cost whatever its size, and nothing a client sends forges a log line.

Each case is a mutation of demo patient 02 (colon cancer, lung metastasis, CEA 7.2 ng/mL).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from typing import Any

import pytest

from cds_service.clinical.knowledge.terminology import terminology

from .conftest import FIXTURES, SERVICE_URL, hook_body, load

BASE = FIXTURES / "02-lung-moderate-cea-only.json"
ICD10_CM = "http://hl7.org/fhir/sid/icd-10-cm"


class _CountingDict(dict):
    """The ICD-10 prefix table, counting the lookups a call makes."""

    lookups = 0

    def get(self, key: Any, default: Any = None) -> Any:
        type(self).lookups += 1
        return super().get(key, default)


def _with_condition_code(code: str, system: str = ICD10_CM) -> dict[str, Any]:
    bundle = copy.deepcopy(load(BASE))
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Condition":
            resource["code"]["coding"].append({"system": system, "code": code})
    return hook_body(bundle)


def test_a_200000_character_icd10_code_is_unreadable_and_costs_no_prefix_walk(client, monkeypatch):
    term = terminology()
    counting = _CountingDict(term._condition_icd)
    monkeypatch.setattr(term, "_condition_icd", counting)
    _CountingDict.lookups = 0
    body = _with_condition_code("C78." + "0" * 200_000)
    started = time.perf_counter()
    resp = client.post(SERVICE_URL, json=body)
    seconds = time.perf_counter() - started
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    # Without the length bound each such code cost ~200,000 prefix lookups (and slices): seconds.
    assert _CountingDict.lookups < 100
    assert seconds < 5  # generous: the whole call, parse included; the quadratic walk took far longer
    # The over-long coding is ignored; the chart's real codes still give the same answer.
    plain = client.post(SERVICE_URL, json=hook_body(load(BASE))).get_json()
    assert resp.get_json()["cards"][0]["extension"] == plain["cards"][0]["extension"]


@pytest.mark.parametrize(
    "code,readable",
    [("C78.01", True), (" c78.01 ", True), ("C7801", True), ("C78.0123", True), ("C78.01234", False)],
)
def test_icd10_codes_longer_than_8_characters_are_unreadable(code, readable):
    term = terminology()
    concept = term.condition_concept([(ICD10_CM, code)])
    assert (concept is not None) is readable


def test_over_long_pcs_and_icdo3_codes_match_nothing():
    term = terminology()
    pcs = "http://www.cms.gov/Medicare/Coding/ICD10"
    assert term.procedure_tags([(pcs, "0BTC0ZZ" * 30_000)]) == []
    icdo3 = "http://terminology.hl7.org/CodeSystem/icd-o-3"
    assert term.organ_of_body_site([(icdo3, "C34.1")]) == "lung"
    assert term.organ_of_body_site([(icdo3, "C34.1" + "9" * 100_000)]) is None


# --- hookInstance: stored and logged, so short and printable ------------------------------------------


@pytest.mark.parametrize(
    "hook_instance",
    ["x" * 65, "abc\ndef", "abc\r\n2026-12-02 CRITICAL forged", "tab\there", "sep\u2028arator", "del\x7f"],
)
def test_a_long_or_unprintable_hook_instance_is_a_400(client, hook_instance):
    resp = client.post(SERVICE_URL, json=hook_body(load(BASE), hook_instance))
    assert resp.status_code == 400, resp.get_data(as_text=True)[:300]
    assert "hookInstance" in resp.get_json()["issue"][0]["diagnostics"]


def test_a_64_character_hook_instance_is_accepted(client):
    assert client.post(SERVICE_URL, json=hook_body(load(BASE), "h" * 64)).status_code == 200


# --- logs: one record, one line, in every format ------------------------------------------------------

FORGED = "nothing\n2026-12-02 20:00:00,000 CRITICAL cds_service.app: forged\u2028also\x85this\x1b[2J"


def _one_record(formatter: logging.Formatter, *, exc: bool = False) -> str:
    record = logging.LogRecord("cds_service.app", logging.INFO, __file__, 1, "refused: %s", (FORGED,), None)
    if exc:
        try:
            raise ValueError(FORGED)
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
    return formatter.format(record)


def test_a_client_newline_cannot_forge_a_text_log_line():
    from cds_service.telemetry.logs import TextFormatter

    text = _one_record(TextFormatter())
    assert text.splitlines() == [text] and "CRITICAL" not in text.split(": ", 1)[0]
    assert "\\x0a2026-12-02" in text and "\\u2028" in text and "\\x1b" in text
    # A traceback has lines of its own, each marked as a continuation: none starts like a record.
    lines = _one_record(TextFormatter(), exc=True).splitlines()
    assert len(lines) > 1 and all(line.startswith("    | ") for line in lines[1:])
    assert not any("CRITICAL" in line and not line.startswith("    | ") for line in lines[1:])


def test_json_log_lines_stay_one_valid_json_document():
    import json

    from cds_service.telemetry.logs import JsonFormatter

    for exc in (False, True):
        line = _one_record(JsonFormatter(), exc=exc)
        assert line.splitlines() == [line] and len(line.split("\u2028")) == 1 and "\x85" not in line
        assert json.loads(line)["message"] == f"refused: {FORGED}"


# --- what a FHIR server or a JWKS endpoint writes never reaches the log ------------------------------

PHI = ("John Smith", "998877")


def _phi_handler(request: Any) -> Any:
    from werkzeug import Response

    if request.path.endswith("/Patient/p1"):
        # A server refusing with the patient's name and MRN in the reason phrase and the body.
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "error", "code": "forbidden", "diagnostics": "John Smith MRN 998877 restricted"}
            ],
        }
        return Response(
            json.dumps(outcome),
            status="403 Restricted John Smith 998877",
            content_type="application/fhir+json",
        )
    # Every search: a body that is not FHIR, quoting the patient.
    return Response("<html>John Smith, MRN 998877: error</html>", status=200, content_type="text/html")


def test_no_upstream_text_reaches_the_log_or_the_answer(client, httpserver, caplog):
    httpserver.expect_request(re.compile(".*")).respond_with_handler(_phi_handler)
    body = {
        "hook": "patient-view",
        "hookInstance": "9c1a5b2e-0000-4000-8000-000000000001",
        "fhirServer": httpserver.url_for("/fhir"),
        "context": {"patientId": "p1"},
    }
    caplog.set_level(logging.DEBUG)
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code == 412, resp.get_data(as_text=True)[:300]
    for text in PHI:
        assert text not in caplog.text, [r.getMessage() for r in caplog.records if text in r.getMessage()]
        assert text not in resp.get_data(as_text=True)


def test_a_jwks_error_page_is_not_quoted_in_the_log(tmp_path, httpserver, caplog):
    from werkzeug import Response

    from cds_service.hooks.jwks import IssuerKeys, KeysUnavailable

    httpserver.expect_request("/jwks").respond_with_response(
        Response("John Smith 998877", status="500 John Smith 998877")
    )
    with pytest.raises(KeysUnavailable) as refused:
        IssuerKeys(httpserver.url_for("/jwks")).key("k1")
    assert "HTTP 500" in str(refused.value) and "998877" not in str(refused.value)

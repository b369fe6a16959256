"""Optional data the EHR's FHIR server would not give, end to end through the hook endpoint
(docs/clinical-decisions.md, "Data the FHIR server would not give"; docs/service-contract.md §2):
the factor that would have used it is unknown where it could change the answer, and the card says
which check could not be made. Also what an optional search that fails other than by refusal is.

The required data comes in the prefetch; the optional searches go to a real HTTP server
(pytest-httpserver) that refuses them, breaks, or answers something that is not FHIR.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug.wrappers import Response

from .builders import cea, crc, lung_met, n_category, patient, resection
from .conftest import SERVICE_URL, hook_body

MEDICATION_KEYS = ("medicationrequests", "medicationadministrations", "medicationstatements")
MEDICATION_PATHS = ("/fhir/MedicationRequest", "/fhir/MedicationAdministration", "/fhir/MedicationStatement")
PN0 = "1229947003"


def _chart() -> dict[str, Any]:
    """Lung only, every factor absent but the CEA: 12 ng/mL at detection, 3 three months later."""
    resources = [
        patient(),
        crc(onset="2019-01-10"),
        lung_met(onset="2022-06-01"),
        resection("2019-02-01"),
        n_category("pathologic", PN0),
        cea(12.0, date="2022-06-10", id="cea-12"),
        cea(3.0, date="2022-09-01", id="cea-3"),
    ]
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def _body(base: str, *, fetch: tuple[str, ...]) -> dict[str, Any]:
    """The chart fully prefetched, but the keys in `fetch` left for the service to read from `base`."""
    body = hook_body(_chart())
    for key in fetch:
        del body["prefetch"][key]
    body["fhirServer"] = base
    body["fhirAuthorization"] = {
        "access_token": "tok-unread",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "test",
    }
    return body


def _assessment(resp: Any) -> dict[str, Any]:
    (card,) = resp.get_json()["cards"]
    return card["extension"]["crc-cds-assessment"]


def _refuse(fhir: HTTPServer, status: int = 403) -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "forbidden"}]}
    for path in MEDICATION_PATHS:
        fhir.expect_request(path).respond_with_response(
            Response(json.dumps(outcome), status=status, content_type="application/fhir+json")
        )


def test_medications_refused_make_a_cea_that_may_be_on_treatment_unknown(client, fhir):
    base = fhir.url_for("/fhir")
    read = client.post(SERVICE_URL, json=_body(base, fetch=()))
    cea_read = _assessment(read)["factors"][0]
    assert (cea_read["status"], cea_read["sources"]) == ("absent", ["Observation/cea-3"])
    assert _assessment(read)["recommendation"] == "upfront-local-therapy"

    _refuse(fhir)
    resp = client.post(SERVICE_URL, json=_body(base, fetch=MEDICATION_KEYS))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    a = _assessment(resp)
    assert [u["search"] for u in a["unavailable"]] == list(MEDICATION_KEYS)
    cea_factor = a["factors"][0]
    assert cea_factor["status"] == "unknown"
    assert cea_factor["sources"] == ["Observation/cea-12", "Observation/cea-3"]
    assert "medication records not read" in cea_factor["reason"]
    # The on-treatment risk decides nothing any more: 0 or 1 of 4, so the data must be completed.
    assert (a["score"], a["recommendation"]) == ({"min": 0, "max": 1}, "complete-risk-data")
    detail = resp.get_json()["cards"][0]["detail"]
    assert "the on-treatment CEA rule could not be checked" in detail
    assert "nor whether systemic therapy has begun" in detail


def test_planned_local_therapy_unread_is_said_on_the_lung_card(client, fhir):
    base = fhir.url_for("/fhir")
    fhir.expect_request("/fhir/ServiceRequest").respond_with_response(Response("", status=403))
    resp = client.post(SERVICE_URL, json=_body(base, fetch=("servicerequests",)))
    assert resp.status_code == 200
    a = _assessment(resp)
    assert a["unavailable"] == [{"search": "servicerequests", "reason": "HTTP 403"}]
    detail = resp.get_json()["cards"][0]["detail"]
    assert "Whether lung ablation or SBRT is already ordered could not be checked" in detail
    assert "on-treatment CEA rule" not in detail  # the medication records were read
    assert a["factors"][0]["status"] == "absent"


@pytest.mark.parametrize(
    ("response", "cause"),
    [
        (lambda: Response("down", status=500), "HTTP 500"),
        (lambda: Response("<html>bad gateway</html>", status=502, content_type="text/html"), "HTTP 502"),
        (lambda: Response("down", status=503), "HTTP 503"),
        (lambda: Response("<html>ok</html>", status=200, content_type="text/html"), "not FHIR"),
        (lambda: Response('{"hello": 1}', status=200, content_type="application/fhir+json"), "not FHIR"),
    ],
    ids=["500", "502 after retries", "503 after retries", "html", "json not fhir"],
)
def test_an_optional_search_that_fails_other_than_by_refusal_is_a_412(client, fhir, response, cause):
    # Service contract §2: only a refusal (400/401/403/404/405/501, an OperationOutcome) or running
    # out of time means "no data of that kind"; a broken server or an answer that is not FHIR is the
    # 412 of "answers something that is not FHIR" / "the FHIR server is down", naming the search.
    base = fhir.url_for("/fhir")
    for path in MEDICATION_PATHS[:1]:
        fhir.expect_request(path).respond_with_handler(lambda _: response())
    resp = client.post(SERVICE_URL, json=_body(base, fetch=MEDICATION_KEYS[:1]))
    assert resp.status_code == 412, resp.get_data(as_text=True)
    outcome = resp.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    diagnostics = outcome["issue"][0]["diagnostics"]
    assert f"search 'medicationrequests' (MedicationRequest): {cause}" in diagnostics
    assert "hello" not in diagnostics and "html" not in diagnostics.lower()


@pytest.mark.parametrize(
    "headers", [{"Retry-After": "30"}, {"RateLimit-Reset": "30"}], ids=["retry-after", "ratelimit-reset"]
)
def test_an_optional_search_asked_to_wait_past_the_budget_is_unavailable_as_rate_limited(
    client, fhir, headers
):
    # Service contract §2: a 429 or 503 whose wait runs past the budget fails the search as
    # rate-limited, which for an optional search means no data of that kind, at once.
    base = fhir.url_for("/fhir")
    fhir.expect_request(MEDICATION_PATHS[0]).respond_with_response(
        Response("busy", status=503, headers=headers)
    )
    resp = client.post(SERVICE_URL, json=_body(base, fetch=MEDICATION_KEYS[:1]))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert _assessment(resp)["unavailable"] == [{"search": "medicationrequests", "reason": "rate-limited"}]
    assert len(fhir.log) == 1  # no pointless retry

"""The HTTP contract (docs/service-contract.md): discovery, hook, status codes, OperationOutcome bodies."""

from __future__ import annotations

import json

import pytest

from cds_service.hooks.catalogue import services
from cds_service.hooks.models import CardsResponse

from .conftest import FIXTURES, SERVICE_URL, hook_body, load

HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"


def _empties(value, path="$"):
    """Paths holding null / "" / [] / {} (the CDS Hooks JSON rule forbids them)."""
    if value is None or value == "" or value == [] or value == {}:
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _empties(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _empties(v, f"{path}[{i}]")


def assert_operation_outcome(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error"
    assert issue["diagnostics"]
    if code:
        assert issue["code"] == code
    text = resp.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    return issue


def test_discovery_lists_the_patient_view_service(client):
    resp = client.get("/cds-services")
    assert resp.status_code == 200
    doc = resp.get_json()
    (svc,) = doc["services"]
    assert svc["hook"] == "patient-view" and svc["id"] == "crc-metastases"
    assert svc["title"] and svc["description"]
    assert {
        "patient",
        "conditions",
        "observations",
        "procedures",
        "bodystructures",
        "medicationrequests",
        "servicerequests",
    } <= set(svc["prefetch"])
    for template in svc["prefetch"].values():
        assert (
            template.startswith("Patient/{{context.patientId}}")
            or "?patient={{context.patientId}}" in template
        )
    assert list(_empties(doc)) == []


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_hook_answers_cards_following_the_json_rule(client):
    resp = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK)))
    assert resp.status_code == 200
    assert resp.content_type.startswith("application/json")
    doc = resp.get_json()
    assert list(_empties(doc)) == []
    CardsResponse.model_validate(doc)  # the CDS Hooks 2.0 wire model
    (card,) = doc["cards"]
    assert len(card["summary"]) < 140
    assert card["indicator"] in {"info", "warning", "critical"}
    assert (
        card["source"]["label"] and card["source"]["url"].startswith("https://") and card["source"]["topic"]
    )
    assert card["selectionBehavior"] == "any"
    assert all(s["uuid"] and s["actions"] for s in card["suggestions"])
    assert all(r["display"] for r in card["overrideReasons"])


def test_same_request_same_bytes_and_a_new_hook_instance_new_uuids(client):
    body = hook_body(load(HIGH_RISK))
    first = client.post(SERVICE_URL, json=body).get_data()
    again = client.post(SERVICE_URL, json=body).get_data()
    assert first == again
    other = client.post(SERVICE_URL, json={**body, "hookInstance": "another-instance"}).get_json()
    card_a, card_b = json.loads(first)["cards"][0], other["cards"][0]
    assert card_a["uuid"] != card_b["uuid"]
    assert {k: v for k, v in card_a.items() if k not in ("uuid", "suggestions")} == {
        k: v for k, v in card_b.items() if k not in ("uuid", "suggestions")
    }


def test_out_of_scope_patient_gets_empty_cards(client):
    resp = client.post(SERVICE_URL, json=hook_body(load(FIXTURES / "16-out-peritoneal-only.json")))
    assert resp.status_code == 200 and resp.get_json() == {"cards": []}


# --- bad input: each status code of the contract ---------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'"text"', b"null"],
    ids=["malformed", "undecodable", "array", "string", "null"],
)
def test_malformed_body_is_400(client, data):
    assert_operation_outcome(
        client.post(SERVICE_URL, data=data, content_type="application/json"), 400, "invalid"
    )


def test_empty_body_is_400(client):
    issue = assert_operation_outcome(client.post(SERVICE_URL, data=b"", content_type="application/json"), 400)
    assert "empty" in issue["diagnostics"]


@pytest.mark.parametrize("drop", ["hook", "hookInstance", "context", "context.patientId"])
def test_missing_required_field_is_400(client, drop):
    body = hook_body(load(HIGH_RISK))
    if "." in drop:
        body["context"].pop(drop.split(".")[1])
    else:
        body.pop(drop)
    issue = assert_operation_outcome(client.post(SERVICE_URL, json=body), 400, "invalid")
    assert drop.split(".")[-1] in issue["diagnostics"]


def test_wrong_hook_is_400(client):
    body = {**hook_body(load(HIGH_RISK)), "hook": "order-sign"}
    issue = assert_operation_outcome(client.post(SERVICE_URL, json=body), 400, "invalid")
    assert "order-sign" in issue["diagnostics"]


def test_unknown_service_is_404(client):
    assert_operation_outcome(
        client.post("/cds-services/nope", json=hook_body(load(HIGH_RISK))), 404, "not-found"
    )


@pytest.mark.parametrize(
    "value",
    [{"foo": "bar"}, "Patient/123", [1, 2, 3], 42],
    ids=["no-resourceType", "string", "list", "number"],
)
def test_prefetch_that_is_not_fhir_is_400(client, value):
    body = hook_body(load(HIGH_RISK))
    body["prefetch"]["patient"] = value
    assert_operation_outcome(client.post(SERVICE_URL, json=body), 400, "invalid")


def test_search_prefetch_that_is_not_a_bundle_is_400(client):
    body = hook_body(load(HIGH_RISK))
    body["prefetch"]["conditions"] = {"resourceType": "Condition", "id": "x"}
    assert_operation_outcome(client.post(SERVICE_URL, json=body), 400, "invalid")


def test_bundle_with_non_fhir_entries_is_400(client):
    body = hook_body(load(HIGH_RISK))
    body["prefetch"]["conditions"]["entry"].append({"resource": {"no": "type"}})
    assert_operation_outcome(client.post(SERVICE_URL, json=body), 400, "invalid")


def test_no_prefetch_and_no_fhir_server_is_412(client):
    body = hook_body(load(HIGH_RISK))
    body.pop("prefetch")
    issue = assert_operation_outcome(client.post(SERVICE_URL, json=body), 412)
    assert "fhirServer" in issue["diagnostics"]


def test_prefetch_operation_outcome_without_fhir_server_is_412(client):
    body = hook_body(load(HIGH_RISK))
    body["prefetch"]["observations"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout"}],
    }
    issue = assert_operation_outcome(client.post(SERVICE_URL, json=body), 412)
    assert "observations" in issue["diagnostics"]


@pytest.mark.parametrize("state", ["null", "empty-bundle"])
def test_search_keys_with_no_data_give_no_cards_without_fetching(client, state):
    body = hook_body(load(HIGH_RISK))
    body["fhirServer"] = "http://127.0.0.1:9/fhir"  # a closed port: any fetch would fail with 412
    for key in services()["crc-metastases"].search_keys:
        body["prefetch"][key] = None if state == "null" else {"resourceType": "Bundle", "type": "searchset"}
    resp = client.post(SERVICE_URL, json=body)
    assert resp.status_code == 200 and resp.get_json() == {"cards": []}


def test_body_over_the_limit_is_413(tmp_path):
    from cds_service.settings import Settings
    from cds_service.web.app import create_app

    app = create_app(Settings(auth_required=False, max_body_bytes=1000))
    resp = app.test_client().post(
        SERVICE_URL, data=b"{" + b" " * 5000 + b"}", content_type="application/json"
    )
    assert_operation_outcome(resp, 413, "too-long")


def test_unknown_route_and_method_get_operation_outcomes(client):
    assert_operation_outcome(client.get("/nowhere"), 404)
    assert_operation_outcome(client.get(SERVICE_URL), 405)


def test_auth_required_refuses_calls_without_a_valid_client_jwt(tmp_path):
    # The default: a call needs a client JWT from a trusted issuer (tests/test_auth.py covers each
    # check); with no token, or a junk one, the answer is the same generic 401. Discovery stays open.
    from cds_service.settings import Settings
    from cds_service.web.app import create_app

    app = create_app(Settings(auth_required=True))
    for headers in ({}, {"Authorization": "Bearer junk"}):
        resp = app.test_client().post(SERVICE_URL, json=hook_body(load(HIGH_RISK)), headers=headers)
        issue = assert_operation_outcome(resp, 401, "security")
        assert issue["diagnostics"] == "authentication failed"
    assert app.test_client().get("/cds-services", headers={"Authorization": "Bearer junk"}).status_code == 200


def test_cors_preflight_and_headers(client):
    pre = client.options(
        SERVICE_URL,
        headers={"Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code in (200, 204)
    assert pre.headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    assert client.get("/cds-services").headers["Access-Control-Allow-Origin"] == "*"


def test_unexpected_error_is_a_plain_500_without_trace(client, monkeypatch):
    import cds_service.pipeline as engine

    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "derive_facts", boom)
    resp = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK)))
    issue = assert_operation_outcome(resp, 500, "exception")
    assert "secret" not in resp.get_data(as_text=True) and issue["diagnostics"] == "internal error"


def test_cors_origins_match_however_written_and_none_is_said_at_start(tmp_path, caplog):
    """A configured origin with a trailing slash still matches the browser's Origin (which has none);
    an empty list, which turns every browser-based client away, is said at start."""
    from cds_service.settings import Settings
    from cds_service.web.app import create_app

    origin = "http://127.0.0.1:8082"
    db = f"sqlite:///{tmp_path / 's.db'}"
    app = create_app(Settings(auth_required=False, database_url=db, cors_origins=origin + "/"))
    resp = app.test_client().get("/cds-services", headers={"Origin": origin})
    assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert "CDS_CORS_ORIGINS is empty" not in caplog.text
    none = create_app(Settings(auth_required=False, database_url=db, cors_origins=""))
    assert "Access-Control-Allow-Origin" not in none.test_client().get("/cds-services").headers
    assert "CDS_CORS_ORIGINS is empty" in caplog.text

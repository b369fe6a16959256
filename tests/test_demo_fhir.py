"""The demo's read-only FHIR endpoint, through Flask's test client and over real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from urllib.parse import urlencode, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import make_server

from cds_service.fetch.client import fetch_queries
from cds_service.settings import Settings
from cds_service.web.demo_fhir import create_fhir_blueprint

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"


def observation(oid: str, patient: str, code: str, system: str = LOINC) -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


RESOURCES: list[dict] = [
    {"resourceType": "Patient", "id": "p1"},
    {"resourceType": "Patient", "id": "p2"},
    observation("cea-1", "p1", "2039-6"),
    observation("cea-2", "p1", "2039-6"),
    observation("hb-1", "p1", "718-7"),
    observation("cea-3", "p2", "2039-6"),
    {
        "resourceType": "Condition",
        "id": "crc",
        "code": {"coding": [{"system": SNOMED, "code": "363406005"}]},
        "subject": {"reference": "Patient/p1"},
    },
    # A transaction-style Bundle: ids from urn:uuid fullUrls, references by urn:uuid.
    {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:aaa", "resource": {"resourceType": "Patient"}},
            {
                "fullUrl": "urn:uuid:bbb",
                "resource": {"resourceType": "Procedure", "subject": {"reference": "urn:uuid:aaa"}},
            },
        ],
    },
]


@pytest.fixture
def client() -> FlaskClient:
    app = Flask(__name__)
    app.register_blueprint(create_fhir_blueprint(RESOURCES))
    return app.test_client()


def ids(body: dict) -> list[str]:
    return [e["resource"]["id"] for e in body.get("entry", [])]


def test_metadata(client: FlaskClient) -> None:
    response = client.get("/fhir/metadata")
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"
    body = response.get_json(force=True)
    assert body["resourceType"] == "CapabilityStatement" and body["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in body["rest"][0]["resource"]}
    assert {"Patient", "Observation", "Condition", "Procedure"} <= types
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_read_and_404(client: FlaskClient) -> None:
    response = client.get("/fhir/Patient/p1")
    assert response.get_json(force=True) == {"resourceType": "Patient", "id": "p1"}
    assert response.mimetype == "application/fhir+json"
    missing = client.get("/fhir/Patient/nobody")
    assert missing.status_code == 404 and missing.mimetype == "application/fhir+json"
    outcome = missing.get_json(force=True)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "not-found"
    assert missing.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("patient=p1", ["cea-1", "cea-2", "hb-1"]),
        ("patient=Patient/p1", ["cea-1", "cea-2", "hb-1"]),
        ("subject=Patient/p2", ["cea-3"]),
        ("subject=p2", ["cea-3"]),
        (f"patient=p1&code={LOINC}|2039-6", ["cea-1", "cea-2"]),
        ("patient=p1&code=718-7", ["hb-1"]),
        (f"patient=p1&code={LOINC}|718-7,{LOINC}|2039-6", ["cea-1", "cea-2", "hb-1"]),
        (f"code={SNOMED}|2039-6", []),
        (f"code={LOINC}|", ["cea-1", "cea-2", "hb-1", "cea-3"]),
        ("_id=cea-3,hb-1", ["hb-1", "cea-3"]),
        ("patient=p1&_sort=-date&whatever=1", ["cea-1", "cea-2", "hb-1"]),  # unknown params ignored
        ("patient=nobody", []),
    ],
)
def test_search_parameters(client: FlaskClient, query: str, expected: list[str]) -> None:
    response = client.get(f"/fhir/Observation?{query}")
    body = response.get_json(force=True)
    assert response.status_code == 200 and body["resourceType"] == "Bundle" and body["type"] == "searchset"
    assert ids(body) == expected and body["total"] == len(expected)
    if not expected:
        assert "entry" not in body


@pytest.mark.parametrize("split", ["all-in-body", "some-in-url"])
def test_post_search_as_the_cds_hooks_sandbox_sends_it(client: FlaskClient, split: str) -> None:
    form = [("patient", "p1"), ("code", f"{LOINC}|718-7,{LOINC}|2039-6"), ("_count", "2")]
    url = "/fhir/Observation/_search" + ("?patient=p1" if split == "some-in-url" else "")
    body_form = form[1:] if split == "some-in-url" else form
    response = client.post(url, data=urlencode(body_form), content_type="application/x-www-form-urlencoded")
    body = response.get_json(force=True)
    assert response.status_code == 200 and body["type"] == "searchset"
    assert ids(body) == ["cea-1", "cea-2"] and body["total"] == 3
    # The next page is a plain GET search carrying every parameter, the body's too.
    (nxt,) = [link["url"] for link in body["link"] if link["relation"] == "next"]
    parts = urlsplit(nxt)
    assert parts.path == "/fhir/Observation" and "code=" in parts.query
    assert ids(client.get(f"{parts.path}?{parts.query}").get_json(force=True)) == ["hb-1"]
    assert all(e["fullUrl"].endswith(f"/fhir/Observation/{e['resource']['id']}") for e in body["entry"])


def test_post_search_needs_a_form_body(client: FlaskClient) -> None:
    response = client.post("/fhir/Observation/_search", json={"patient": "p1"})
    assert response.status_code == 415 and response.get_json(force=True)["resourceType"] == "OperationOutcome"
    assert client.post("/fhir/lowercase/_search", data={}).status_code == 404


def test_search_other_types(client: FlaskClient) -> None:
    assert ids(client.get("/fhir/Condition?patient=p1").get_json(force=True)) == ["crc"]
    assert ids(client.get("/fhir/Procedure?patient=aaa").get_json(force=True)) == ["bbb"]
    assert ids(client.get("/fhir/Patient?_id=p2").get_json(force=True)) == ["p2"]
    assert client.get("/fhir/MedicationRequest?patient=p1").get_json(force=True)["total"] == 0


def test_paging_with_next_links(client: FlaskClient) -> None:
    url: str | None = "/fhir/Observation?patient=p1&_count=2"
    seen: list[str] = []
    pages = 0
    while url:
        body = client.get(url).get_json(force=True)
        pages += 1
        assert body["total"] == 3
        seen += ids(body)
        nxt = [link["url"] for link in body["link"] if link["relation"] == "next"]
        url = None
        if nxt:
            parts = urlsplit(nxt[0])
            assert parts.scheme == "http" and parts.netloc  # absolute, as FHIR servers send
            url = f"{parts.path}?{parts.query}"
    assert pages == 2 and seen == ["cea-1", "cea-2", "hb-1"]


def test_default_count_and_bad_count(client: FlaskClient) -> None:
    app = Flask(__name__)
    many = [observation(f"o{i}", "p1", "2039-6") for i in range(60)]
    app.register_blueprint(create_fhir_blueprint(many))
    body = app.test_client().get("/fhir/Observation?patient=p1").get_json(force=True)
    assert len(body["entry"]) == 50 and body["total"] == 60
    assert any(link["relation"] == "next" for link in body["link"])
    bad = client.get("/fhir/Observation?_count=lots")
    assert bad.status_code == 400 and bad.get_json(force=True)["resourceType"] == "OperationOutcome"


def test_cors_preflight(client: FlaskClient) -> None:
    response = client.options(
        "/fhir/Observation",
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert response.status_code in (200, 204)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert {"GET", "POST"} <= set(response.headers["Access-Control-Allow-Methods"].split(", "))
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()


def test_unknown_paths_are_fhir_404s(client: FlaskClient) -> None:
    for path in ("/fhir/Patient/p1/_history/1/x", "/fhir/", "/fhir/lowercase"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.get_json(force=True)["resourceType"] == "OperationOutcome"


@pytest.fixture
def live_server() -> Iterator[str]:
    app = Flask(__name__)
    app.register_blueprint(create_fhir_blueprint(RESOURCES))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}/fhir"
    server.shutdown()
    thread.join(2)


def test_fhir_client_reads_the_demo_endpoint(live_server: str) -> None:
    """The two halves fit: the client pages through the demo endpoint over real HTTP."""
    queries = {
        "patient": "Patient/p1",
        "cea": f"Observation?patient=p1&code={LOINC}|2039-6&_count=1",
        "conditions": "Condition?patient=p1",
        "nobody": "Patient/nobody",
    }
    results, report = fetch_queries(live_server, "t", queries, Settings(fhir_timeout_s=3))
    assert results["patient"] == {"resourceType": "Patient", "id": "p1"}
    assert ids(results["cea"]) == ["cea-1", "cea-2"] and results["cea"]["total"] == 2
    assert ids(results["conditions"]) == ["crc"] and results["nobody"] is None
    assert {s.key: s.pages for s in report.searches}["cea"] == 2

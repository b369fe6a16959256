"""How the service meets real CDS clients at the HTTP edge: slashes, 401 challenges, CORS."""

from __future__ import annotations

import pytest

from .conftest import FIXTURES, SERVICE_URL, hook_body, load

HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"


@pytest.mark.parametrize("path", ["/cds-services", "/cds-services/", "//cds-services", "//cds-services//"])
def test_discovery_is_found_with_a_trailing_or_doubled_slash(client, path):
    # PATH_INFO as a server passes it: the test client would read "//x" as a host name.
    resp = client.get("/", environ_overrides={"PATH_INFO": path})
    assert resp.status_code == 200, (resp.status_code, resp.headers.get("Location"))
    assert resp.get_json()["services"][0]["id"] == "crc-metastases"


def test_a_doubled_slash_in_a_hook_call_is_answered_not_redirected(client):
    # A client whose base URL ends in "/" calls //cds-services/...: a 308 to HTML would lose the POST.
    doubled = {"PATH_INFO": "/" + SERVICE_URL}
    resp = client.post("/", json=hook_body(load(HIGH_RISK)), environ_overrides=doubled)
    assert resp.status_code == 200 and resp.get_json()["cards"]
    missing = client.post("/", json={}, environ_overrides={"PATH_INFO": "//cds-services//nope"})
    assert missing.status_code == 404 and missing.mimetype == "application/fhir+json"


def test_every_401_carries_a_bearer_challenge(tmp_path):
    from cds_service.settings import Settings
    from cds_service.web.app import create_app

    app = create_app(Settings(auth_required=True, database_url=f"sqlite:///{tmp_path / 'a.db'}"))
    client = app.test_client()
    for resp in (
        client.post(SERVICE_URL, json={}),
        client.post(SERVICE_URL, json={}, headers={"Authorization": "Bearer junk"}),
        client.post(f"{SERVICE_URL}/feedback", json={}, headers={"Authorization": "Basic eDp5"}),
    ):
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"


def test_cors_allows_and_exposes_the_request_id(client):
    preflight = client.options(
        SERVICE_URL,
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-request-id",
        },
    )
    allowed = {h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-request-id"} <= allowed
    resp = client.post(
        SERVICE_URL,
        json=hook_body(load(HIGH_RISK)),
        headers={"Origin": "https://sandbox.cds-hooks.org", "X-Request-Id": "trace-42"},
    )
    assert resp.headers["X-Request-Id"] == "trace-42"
    assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]


def test_evidence_links_follow_the_host_each_call_reached_us_at(client):
    """Without CDS_PUBLIC_BASE_URL a card links the evidence pages where the call reached the service;
    the base URL is remembered per Host (and scheme) for speed, never mixed between hosts."""
    body = hook_body(load(HIGH_RISK))
    for n in [*range(70), 3, 69]:  # more hosts than are remembered, then some seen before
        resp = client.post(SERVICE_URL, json=body, base_url=f"https://host-{n}.example:8443/")
        links = [link["url"] for card in resp.get_json()["cards"] for link in card.get("links", [])]
        pages = [u for u in links if "/evidence" in u]
        assert pages and all(u.startswith(f"https://host-{n}.example:8443/evidence") for u in pages), n


def test_a_browser_gets_one_allow_origin_header_from_the_demo_fhir_server_and_the_service(tmp_path):
    """The demo FHIR server sets its own CORS headers and the app adds the service's: a second
    Access-Control-Allow-Origin would make a browser (the CDS Hooks sandbox) refuse the answer."""
    import datetime as dt

    from cds_service.cli.fixtures import demo_resources
    from cds_service.settings import Settings
    from cds_service.web.app import create_app

    for allowed in (["*"], ["http://127.0.0.1:8081"]):
        settings = Settings(
            auth_required=False, database_url=f"sqlite:///{tmp_path / 'a.db'}", cors_origins=allowed
        )
        app = create_app(settings, demo_resources=demo_resources(shift_to=dt.date(2026, 12, 3)))
        client = app.test_client()
        origin = {"Origin": "http://127.0.0.1:8081"}
        preflight = {**origin, "Access-Control-Request-Method": "POST"}
        for resp in (
            client.get("/fhir/metadata", headers=origin),
            client.options("/fhir/Patient", headers=preflight),
            client.get("/cds-services", headers=origin),
            client.options(SERVICE_URL, headers=preflight),
        ):
            assert len(resp.headers.getlist("Access-Control-Allow-Origin")) == 1, (allowed, resp.request.path)

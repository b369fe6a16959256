"""CDS_FHIR_SERVER_ALLOWLIST per trusted issuer, through the hook endpoint with real client JWTs."""

from __future__ import annotations

import logging

from cds_service.settings import Settings
from cds_service.web.app import create_app

from .conftest import hook_body, load
from .test_auth import (  # noqa: F401 - fixtures used by name
    HIGH_RISK,
    ISS,
    auth_settings,
    call,
    ec_key,
    evil_key,
    jwks_url,
    make_app,
    rsa_key,
    signer,
)


def _no_prefetch(fhir_server: str) -> dict:
    body = hook_body(load(HIGH_RISK))
    body["prefetch"] = {}
    body["fhirServer"] = fhir_server
    return body


def test_a_call_may_only_name_its_own_issuers_fhir_servers(tmp_path, jwks_url, signer, httpserver):  # noqa: F811
    own = httpserver.url_for("/own/fhir")
    allowlist = {ISS: [own], "https://other-ehr.example": ["https://other.example/fhir"]}
    app = make_app(auth_settings(tmp_path, jwks_url, fhir_server_allowlist=allowlist))
    other = call(app, signer.rs384(), _no_prefetch("https://other.example/fhir"))
    assert other.status_code == 412 and "ALLOWLIST" in other.get_json()["issue"][0]["diagnostics"]
    httpserver.expect_request("/own/fhir/Patient/p1").respond_with_json({}, status=404)
    body = _no_prefetch(own)
    body["context"]["patientId"] = "p1"
    mine = call(app, signer.rs384(), body)
    assert mine.status_code == 412 and "patient not found" in mine.get_json()["issue"][0]["diagnostics"]
    assert httpserver.log  # the own server was asked; the other one never was


def test_serve_with_auth_and_no_allowlist_warns_at_start(tmp_path, jwks_url, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="cds_service.auth")
    make_app(auth_settings(tmp_path, jwks_url))
    assert "CDS_FHIR_SERVER_ALLOWLIST is not set" in caplog.text
    caplog.clear()
    make_app(auth_settings(tmp_path, jwks_url, fhir_server_allowlist=["https://ehr.example/fhir"]))
    create_app(Settings(auth_required=False, database_url=f"sqlite:///{tmp_path / 'x.db'}"))
    assert "CDS_FHIR_SERVER_ALLOWLIST" not in caplog.text

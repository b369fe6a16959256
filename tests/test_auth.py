"""CDS Hooks 2.0 client JWT authentication, end to end through HTTP.

Keys are generated here; the EHR's JWKS (and an attacker's) is served by pytest-httpserver. Every
acceptance and every rejection is a call to the real app; each 401 must be the same generic
OperationOutcome, and the log must say which check failed without ever holding the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from pydantic import ValidationError
from pytest_httpserver import HTTPServer
from werkzeug import Response

from cds_service.hooks import client_jwt as auth
from cds_service.hooks import jwks
from cds_service.settings import Settings
from cds_service.store.database import close_stores
from cds_service.web.app import create_app

from .conftest import FIXTURES, SERVICE_URL, TODAY, hook_body, load
from .hostile import Peer, respond, trickle
from .test_http_contract import assert_operation_outcome

ISS = "https://ehr.example.org"
BASE = "https://cds.example.org"
SERVICE_AUD = f"{BASE}{SERVICE_URL}"
FEEDBACK_URL = f"{SERVICE_URL}/feedback"
HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"
RS_KID, ES_KID, EVIL_KID = "ehr-rs384", "ehr-es384", "evil-rs384"


# --- keys, JWKS, tokens --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def evil_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private_key: Any, kid: str, alg: str | None) -> dict[str, Any]:
    algorithm = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(private_key, rsa.RSAPrivateKey)
        else jwt.algorithms.ECAlgorithm
    )
    key = json.loads(algorithm.to_jwk(private_key.public_key()))
    key.update({"kid": kid, "use": "sig"})
    if alg:
        key["alg"] = alg
    return key


@pytest.fixture
def jwks_url(httpserver: HTTPServer, rsa_key, ec_key, evil_key) -> str:
    httpserver.expect_request("/jwks/trusted.json").respond_with_json(
        {"keys": [jwk(rsa_key, RS_KID, "RS384"), jwk(ec_key, ES_KID, "ES384")]}
    )
    httpserver.expect_request("/jwks/attacker.json").respond_with_json(
        {"keys": [jwk(evil_key, EVIL_KID, "RS384")]}
    )
    return httpserver.url_for("/jwks/trusted.json")


def b64(data: bytes | dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c = {
        "iss": ISS,
        "sub": "ehr-client",
        "aud": SERVICE_AUD,
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}  # None: leave the claim out


class Signer:
    """Signs client JWTs as the EHR would (jku = the trusted JWKS URL unless told otherwise)."""

    def __init__(self, jwks_url: str, rsa_key: Any, ec_key: Any) -> None:
        self.jwks_url, self.rsa_key, self.ec_key = jwks_url, rsa_key, ec_key

    def rs384(self, key: Any = None, kid: str = RS_KID, jku: str | None = "trusted", **over: Any) -> str:
        return self._sign(key or self.rsa_key, "RS384", kid, jku, over)

    def es384(self, **over: Any) -> str:
        return self._sign(self.ec_key, "ES384", ES_KID, "trusted", over)

    def _sign(self, key: Any, alg: str, kid: str, jku: str | None, over: dict[str, Any]) -> str:
        headers = {"kid": kid, "typ": "JWT"}
        if jku:
            headers["jku"] = self.jwks_url if jku == "trusted" else jku
        return jwt.encode(claims(**over), key, algorithm=alg, headers=headers)

    def unsigned(self, alg: str, signature: Callable[[bytes], bytes]) -> str:
        """A token with any `alg`, its signature computed by `signature(signing_input)`."""
        header = {"alg": alg, "typ": "JWT", "kid": RS_KID, "jku": self.jwks_url}
        signing_input = f"{b64(header)}.{b64(claims())}"
        return f"{signing_input}.{b64(signature(signing_input.encode()))}"


@pytest.fixture
def signer(jwks_url, rsa_key, ec_key) -> Signer:
    return Signer(jwks_url, rsa_key, ec_key)


def auth_settings(tmp_path, jwks_url: str, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "auth_required": True,
        "trusted_issuers": {ISS: jwks_url},
        "public_base_url": BASE,
        "database_url": f"sqlite:///{tmp_path / 'auth.db'}",
    }
    values.update(over)
    return Settings(**values)


def make_app(settings: Settings) -> Flask:
    app = create_app(settings, today=lambda: TODAY)
    app.config["TESTING"] = False  # errors go through the real handlers
    return app


@pytest.fixture
def app(tmp_path, jwks_url) -> Flask:
    return make_app(auth_settings(tmp_path, jwks_url))


@pytest.fixture
def body() -> dict[str, Any]:
    return hook_body(load(HIGH_RISK))


def call(app: Flask, token: str | None, body: dict[str, Any], url: str = SERVICE_URL, scheme: str = "Bearer"):
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return app.test_client().post(url, json=body, headers=headers)


def assert_refused(resp) -> dict[str, Any]:
    issue = assert_operation_outcome(resp, 401, "security")
    assert issue["diagnostics"] == auth.GENERIC_401
    assert resp.headers["WWW-Authenticate"] == "Bearer"  # RFC 6750, on every 401
    return resp.get_json()


# --- accepted ------------------------------------------------------------------------------------------


def test_valid_rs384_is_accepted(app, signer, body):
    resp = call(app, signer.rs384(), body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["cards"]


def test_valid_es384_is_accepted(app, signer, body):
    assert call(app, signer.es384(), body).status_code == 200


def test_aud_as_an_array_is_accepted(app, signer, body):
    assert call(app, signer.rs384(aud=[SERVICE_AUD]), body).status_code == 200
    assert call(app, signer.rs384(aud=["https://other.example/x", SERVICE_AUD]), body).status_code == 200


def test_a_token_without_jku_is_accepted(app, signer, body):
    # jku is OPTIONAL in CDS Hooks 2.0: the issuer's configured JWKS is used either way.
    assert call(app, signer.rs384(jku=None), body).status_code == 200


def test_a_jwk_without_alg_is_accepted(tmp_path, httpserver: HTTPServer, rsa_key, ec_key, body):
    # A JWK's alg is optional (RFC 7517): the key type decides which of RS384/ES384 it can verify.
    httpserver.expect_request("/jwks/bare.json").respond_with_json(
        {"keys": [jwk(rsa_key, RS_KID, None), jwk(ec_key, ES_KID, None)]}
    )
    url = httpserver.url_for("/jwks/bare.json")
    app = make_app(auth_settings(tmp_path, url))
    signer = Signer(url, rsa_key, ec_key)
    assert call(app, signer.rs384(), body).status_code == 200
    assert call(app, signer.es384(), body).status_code == 200


@pytest.fixture
def card(app, signer, body) -> dict[str, Any]:
    resp = call(app, signer.rs384(), body)
    assert resp.status_code == 200
    return resp.get_json()["cards"][0]


def _feedback(card: dict[str, Any]) -> dict[str, Any]:
    return {
        "feedback": [
            {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-03-01T10:05:31Z"}
        ]
    }


@pytest.mark.parametrize("aud", [f"{SERVICE_AUD}/feedback", SERVICE_AUD], ids=["feedback-url", "service-url"])
def test_feedback_accepts_its_own_url_or_the_service_url_as_audience(app, signer, card, aud):
    resp = call(app, signer.rs384(aud=aud), _feedback(card), url=FEEDBACK_URL)
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_feedback_without_a_token_or_for_another_service_is_refused(app, signer, card):
    assert_refused(call(app, None, _feedback(card), url=FEEDBACK_URL))
    other = f"{BASE}/cds-services/another-service/feedback"
    assert_refused(call(app, signer.rs384(aud=other), _feedback(card), url=FEEDBACK_URL))


def test_without_public_base_url_the_audience_is_the_request_url(tmp_path, jwks_url, signer, body):
    app = make_app(auth_settings(tmp_path, jwks_url, public_base_url=None))
    assert call(app, signer.rs384(aud=f"http://localhost{SERVICE_URL}"), body).status_code == 200
    assert_refused(call(app, signer.rs384(), body))  # minted for https://cds.example.org


# --- refused: one test per check, all with the same body ------------------------------------------------


def _tampered_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    flipped = "A" if signature[10] != "A" else "B"
    return f"{header}.{payload}.{signature[:10]}{flipped}{signature[11:]}"


def _tampered_payload(token: str) -> str:
    header, payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged["sub"] = "someone-else"
    return f"{header}.{b64(forged)}.{signature}"


def _hs256_with_public_key(s: Signer) -> str:
    pem = s.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return s.unsigned("HS256", lambda data: hmac.new(pem, data, hashlib.sha256).digest())


# name -> (Authorization header value or None, what the log must say)
REJECTIONS: dict[str, tuple[Callable[[Signer, Any], str | None], str]] = {
    "missing token": (lambda s, evil: None, "no Authorization header"),
    "Basic scheme": (lambda s, evil: "Basic " + base64.b64encode(b"ehr:secret").decode(), "is not Bearer"),
    "empty Bearer": (lambda s, evil: "Bearer ", "empty Bearer token"),
    "bad signature": (lambda s, evil: "Bearer " + _tampered_signature(s.rs384()), "bad signature"),
    "tampered payload": (lambda s, evil: "Bearer " + _tampered_payload(s.rs384()), "bad signature"),
    "expired": (
        lambda s, evil: "Bearer " + s.rs384(iat=int(time.time()) - 900, exp=int(time.time()) - 600),
        "expired",
    ),
    "future iat": (
        lambda s, evil: "Bearer " + s.rs384(iat=int(time.time()) + 3600, exp=int(time.time()) + 3900),
        "issued in the future",
    ),
    "wrong aud": (
        lambda s, evil: "Bearer " + s.rs384(aud=f"{BASE}/cds-services/another-service"),
        "aud is not",
    ),
    "aud of another host": (
        lambda s, evil: "Bearer " + s.rs384(aud=f"https://evil.example{SERVICE_URL}"),
        "aud is not",
    ),
    "untrusted iss": (lambda s, evil: "Bearer " + s.rs384(iss="https://evil.example"), "untrusted iss"),
    "no jti": (lambda s, evil: "Bearer " + s.rs384(jti=None), "no jti claim"),
    "empty jti": (lambda s, evil: "Bearer " + s.rs384(jti=""), "jti not a string"),
    "exp as a string": (
        lambda s, evil: "Bearer " + s.rs384(exp=str(int(time.time()) + 300)),
        "exp is not a number",
    ),
    "iat as a string": (
        lambda s, evil: "Bearer " + s.rs384(iat=str(int(time.time()))),
        "iat is not a number",
    ),
    "exp as a boolean": (lambda s, evil: "Bearer " + s.rs384(exp=True), "exp is not a number"),
    "exp infinite": (lambda s, evil: "Bearer " + s.rs384(exp=float("inf")), "exp is not a number"),
    "exp 10 years ahead": (
        lambda s, evil: "Bearer " + s.rs384(exp=int(time.time()) + 10 * 365 * 86400),
        "token lifetime (exp - iat) over 3600 s",
    ),
    "iat = 0": (lambda s, evil: "Bearer " + s.rs384(iat=0), "token lifetime (exp - iat) over 3600 s"),
    "no exp": (lambda s, evil: "Bearer " + s.rs384(exp=None), "no exp claim"),
    "no iat": (lambda s, evil: "Bearer " + s.rs384(iat=None), "no iat claim"),
    "no aud": (lambda s, evil: "Bearer " + s.rs384(aud=None), "no aud claim"),
    "jku mismatch (attacker JWKS)": (
        lambda s, evil: "Bearer " + s.rs384(evil, EVIL_KID, jku=s.jwks_url.replace("trusted", "attacker")),
        "is not the issuer's JWKS URL",
    ),
    "trusted kid signed with another key": (lambda s, evil: "Bearer " + s.rs384(evil), "bad signature"),
    "unknown kid": (
        lambda s, evil: "Bearer " + s.rs384(evil, "no-such-kid"),
        "not found in the issuer's JWKS",
    ),
    "RS256 instead of RS384": (
        lambda s, evil: "Bearer " + jwt.encode(claims(), s.rsa_key, "RS256", headers={"kid": RS_KID}),
        "algorithm 'RS256' not allowed",
    ),
    "RSA kid under ES384": (
        lambda s, evil: "Bearer " + jwt.encode(claims(), s.ec_key, "ES384", headers={"kid": RS_KID}),
        "does not fit ES384",
    ),
    "no kid": (lambda s, evil: "Bearer " + jwt.encode(claims(), s.rsa_key, "RS384"), "no kid"),
    "alg none": (
        lambda s, evil: "Bearer " + s.unsigned("none", lambda data: b""),
        "algorithm 'none' not allowed",
    ),
    "HS256 signed with the public key": (
        lambda s, evil: "Bearer " + _hs256_with_public_key(s),
        "algorithm 'HS256' not allowed",
    ),
    "not a JWT": (lambda s, evil: "Bearer this-is-not-a-jwt", "not a JWT"),
    "three junk segments": (lambda s, evil: "Bearer a.b.c", "not a JWT"),
    "oversized token": (lambda s, evil: "Bearer " + "a" * (auth.MAX_TOKEN_CHARS + 1), "token longer"),
}


def _refused_call(app, signer, evil_key, body, name):
    build, _ = REJECTIONS[name]
    value = build(signer, evil_key)
    headers = {"Authorization": value} if value is not None else {}
    return value, app.test_client().post(SERVICE_URL, json=body, headers=headers)


@pytest.mark.parametrize("name", list(REJECTIONS))
def test_refused_with_a_generic_401_and_the_reason_in_the_log(app, signer, evil_key, body, name, caplog):
    caplog.set_level(logging.DEBUG)
    value, resp = _refused_call(app, signer, evil_key, body, name)
    assert_refused(resp)
    refusals = [
        r.getMessage() for r in caplog.records if r.name == "cds_service.auth" and "refused" in r.getMessage()
    ]
    assert len(refusals) == 1 and REJECTIONS[name][1] in refusals[0], refusals
    token = (value or "").partition(" ")[2]
    signature = token.rsplit(".", 1)[-1]
    for secret in (token, signature):  # never the token, nor its signature, anywhere in the log
        assert len(secret) < 16 or secret not in caplog.text  # (a few letters may occur by chance)


def test_the_token_lifetime_bound_is_configurable(tmp_path, jwks_url, signer, body, caplog):
    now = int(time.time())
    app = make_app(auth_settings(tmp_path, jwks_url, jwt_max_age_s=600))
    caplog.set_level(logging.INFO)
    assert call(app, signer.rs384(iat=now - 60, exp=now + 500), body).status_code == 200
    assert_refused(call(app, signer.rs384(iat=now, exp=now + 601), body))
    assert "over 600 s" in caplog.text
    # An hour-long token, the default bound, is accepted by default.
    default = make_app(auth_settings(tmp_path, jwks_url))
    assert call(default, signer.rs384(iat=now, exp=now + 3600), body).status_code == 200


def test_a_bad_token_costs_no_jwks_fetch(tmp_path, httpserver: HTTPServer, signer, body):
    # A token refused on its claims alone never makes the service fetch keys.
    app = make_app(auth_settings(tmp_path, signer.jwks_url))
    assert_refused(call(app, signer.rs384(exp=str(int(time.time()) + 300), kid="forged"), body))
    assert _fetches(httpserver, "/jwks/trusted.json") == 0


def test_all_401_bodies_are_identical(app, signer, evil_key, body):
    bodies = {name: _refused_call(app, signer, evil_key, body, name)[1].get_data() for name in REJECTIONS}
    assert len(set(bodies.values())) == 1, bodies


def test_the_log_names_iss_and_jti_of_a_refused_token(app, signer, body, caplog):
    caplog.set_level(logging.INFO)
    jti = str(uuid.uuid4())
    token = signer.rs384(jti=jti, exp=int(time.time()) - 600, iat=int(time.time()) - 900)
    assert_refused(call(app, token, body))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "cds_service.auth"]
    assert "expired" in line and ISS in line and jti in line
    assert token not in caplog.text


def test_the_attacker_jwks_is_never_fetched(app, signer, evil_key, body, httpserver: HTTPServer):
    attacker = signer.jwks_url.replace("trusted", "attacker")
    assert_refused(call(app, signer.rs384(evil_key, EVIL_KID, jku=attacker), body))
    assert not [req for req, _ in httpserver.log if req.path.endswith("attacker.json")]


# --- replay ---------------------------------------------------------------------------------------------


def test_a_replayed_jti_is_refused(app, signer, body, caplog):
    token = signer.rs384()
    assert call(app, token, body).status_code == 200
    caplog.set_level(logging.INFO)
    assert_refused(call(app, token, body))
    assert "replayed jti" in caplog.text
    # Same jti in a freshly signed token: still a replay (the id, not the bytes, is single-use).
    jti = str(uuid.uuid4())
    assert call(app, signer.rs384(jti=jti), body).status_code == 200
    assert_refused(call(app, signer.es384(jti=jti), body))


def test_a_jti_replayed_to_a_second_instance_sharing_the_database_is_refused(
    tmp_path, jwks_url, signer, body
):
    settings = auth_settings(tmp_path, jwks_url)
    token = signer.rs384()
    assert call(make_app(settings), token, body).status_code == 200
    close_stores()  # the second instance opens its own engine and connections, as another process would
    second = make_app(settings)
    assert_refused(call(second, token, body))
    assert call(second, signer.rs384(), body).status_code == 200


def test_the_same_jti_from_another_issuer_is_not_a_replay(tmp_path, jwks_url, signer, rsa_key, ec_key, body):
    other_iss = "https://other-ehr.example.org"
    app = make_app(auth_settings(tmp_path, jwks_url, trusted_issuers={ISS: jwks_url, other_iss: jwks_url}))
    jti = str(uuid.uuid4())
    assert call(app, signer.rs384(jti=jti), body).status_code == 200
    assert call(app, signer.rs384(jti=jti, iss=other_iss), body).status_code == 200


def test_a_token_is_refused_when_its_jti_cannot_be_recorded(tmp_path, jwks_url, signer, body, caplog):
    """Fail closed: without the replay check a valid token is not enough (the store's failure is
    StoreDown to the auth code, which knows no SQL), and the log names the failure, not the token."""
    app = make_app(auth_settings(tmp_path, jwks_url))
    store = app.extensions["cds.audit"].store
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE client_jti")
    caplog.set_level(logging.INFO)
    token = signer.rs384()
    assert_refused(call(app, token, body))
    assert "cannot record the jti (OperationalError)" in caplog.text
    assert token not in caplog.text


# --- the JWKS: cached, refreshed for a new kid, bounded --------------------------------------------------


def _fetches(httpserver: HTTPServer, path: str) -> int:
    return sum(1 for req, _ in httpserver.log if req.path == path)


def test_the_jwks_is_cached_between_calls(app, signer, body, httpserver: HTTPServer):
    for _ in range(3):
        assert call(app, signer.rs384(), body).status_code == 200
    assert _fetches(httpserver, "/jwks/trusted.json") == 1


def test_an_unknown_kid_refreshes_the_jwks_once_per_cooldown(
    tmp_path, httpserver: HTTPServer, rsa_key, ec_key, evil_key, body, monkeypatch
):
    keys = [jwk(rsa_key, RS_KID, "RS384")]
    httpserver.expect_request("/jwks/rotating.json").respond_with_handler(
        lambda request: Response(json.dumps({"keys": keys}), content_type="application/json")
    )
    url = httpserver.url_for("/jwks/rotating.json")
    app = make_app(auth_settings(tmp_path, url))
    signer = Signer(url, rsa_key, ec_key)
    assert call(app, signer.rs384(), body).status_code == 200
    # Forged kids within the cooldown cost no request to the EHR.
    for _ in range(3):
        assert_refused(call(app, signer.rs384(evil_key, "forged-kid"), body))
    assert _fetches(httpserver, "/jwks/rotating.json") == 1
    # The EHR rotates in a new key; once the cooldown is over, its first token triggers one refresh.
    keys.append(jwk(ec_key, ES_KID, "ES384"))
    monkeypatch.setattr(jwks, "JWKS_REFRESH_COOLDOWN_S", 0.0)
    assert call(app, signer.es384(), body).status_code == 200
    assert _fetches(httpserver, "/jwks/rotating.json") == 2


def test_an_oversized_jwks_is_refused(tmp_path, httpserver: HTTPServer, rsa_key, ec_key, body, caplog):
    big = {"keys": [jwk(rsa_key, RS_KID, "RS384")], "padding": "x" * (jwks.JWKS_MAX_BYTES + 1)}
    httpserver.expect_request("/jwks/big.json").respond_with_json(big)
    url = httpserver.url_for("/jwks/big.json")
    app = make_app(auth_settings(tmp_path, url))
    caplog.set_level(logging.INFO)
    assert_refused(call(app, Signer(url, rsa_key, ec_key).rs384(), body))
    assert "JWKS is unavailable" in caplog.text and "larger than" in caplog.text


def test_an_unreachable_jwks_is_a_quick_401_with_a_warning(tmp_path, rsa_key, ec_key, body, caplog):
    url = "http://127.0.0.1:9/jwks.json"  # discard port: nothing listens
    app = make_app(auth_settings(tmp_path, url))
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    assert_refused(call(app, Signer(url, rsa_key, ec_key).rs384(), body))
    assert time.monotonic() - started < jwks.JWKS_TIMEOUT_S + 1
    assert any(r.levelno == logging.WARNING and "unavailable" in r.getMessage() for r in caplog.records)


def test_a_redirecting_jwks_is_not_followed(tmp_path, httpserver: HTTPServer, rsa_key, ec_key, body):
    httpserver.expect_request("/jwks/moved.json").respond_with_data(
        "", status=302, headers={"Location": httpserver.url_for("/jwks/trusted.json")}
    )
    url = httpserver.url_for("/jwks/moved.json")
    app = make_app(auth_settings(tmp_path, url))
    assert_refused(call(app, Signer(url, rsa_key, ec_key).rs384(), body))
    assert _fetches(httpserver, "/jwks/trusted.json") == 0


# --- what stays open -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/cds-services", "/healthz"])
def test_discovery_and_healthz_are_open_even_with_a_junk_token(app, path):
    assert app.test_client().get(path).status_code == 200
    assert app.test_client().get(path, headers={"Authorization": "Bearer not.a.jwt"}).status_code == 200


def test_auth_off_skips_the_check_with_a_startup_warning(tmp_path, jwks_url, body, caplog):
    caplog.set_level(logging.WARNING)
    app = make_app(auth_settings(tmp_path, jwks_url, auth_required=False))
    assert "CDS_AUTH_REQUIRED=false" in caplog.text
    assert call(app, None, body).status_code == 200
    assert call(app, "junk", body).status_code == 200


def test_no_trusted_issuer_warns_at_startup_and_refuses(tmp_path, signer, body, caplog):
    caplog.set_level(logging.WARNING)
    app = make_app(auth_settings(tmp_path, "https://unused.example/jwks", trusted_issuers={}))
    assert "every hook and feedback call will be refused" in caplog.text
    assert_refused(call(app, signer.rs384(), body))


# --- configuration checked at start-up -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        ("[]", "must be a JSON object"),
        ('"https://ehr.example.org"', "must be a JSON object"),
        ('{"https://ehr.example.org": 1}', "must be a JSON object"),
        ("{not json", "is not a JSON object"),
        ('{"https://ehr.example.org": "http://ehr.example.org/jwks"}', "must be an https URL"),
        ('{"https://ehr.example.org": "file:///etc/jwks.json"}', "must be an https URL"),
        ('{"https://ehr.example.org": "ehr.example.org/jwks"}', "must be an https URL"),
    ],
)
def test_a_malformed_trusted_issuers_is_refused_at_startup(monkeypatch, raw, message):
    monkeypatch.setenv("CDS_TRUSTED_ISSUERS", raw)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.parametrize(
    "url", ["https://ehr.example.org/jwks", "http://127.0.0.1:8081/jwks", "http://localhost/j"]
)
def test_https_or_loopback_http_jwks_urls_are_accepted(monkeypatch, url):
    monkeypatch.setenv("CDS_TRUSTED_ISSUERS", json.dumps({ISS: url}))
    assert Settings().trusted_issuers == {ISS: url}


@pytest.mark.slow
def test_serve_prints_a_bad_trusted_issuers_as_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "CDS_TRUSTED_ISSUERS": '{"https://ehr.example.org": "http://ehr.example.org/jwks"}'}
    done = subprocess.run(
        [sys.executable, "-m", "cds_service.cli", "serve", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert "\n" not in err and "CDS_TRUSTED_ISSUERS" in err and "https" in err and "Traceback" not in err


@pytest.mark.slow
def test_serve_with_auth_on_and_no_public_base_url_stops_with_one_line(tmp_path):
    # Without it the aud check would trust the Host header: a token for another host would pass.
    env = {k: v for k, v in os.environ.items() if k != "CDS_PUBLIC_BASE_URL"}
    env["CDS_TRUSTED_ISSUERS"] = json.dumps({ISS: "https://ehr.example.org/jwks"})
    done = subprocess.run(
        [sys.executable, "-m", "cds_service.cli", "serve", "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert "\n" not in err and "CDS_PUBLIC_BASE_URL" in err and "Traceback" not in err


def test_a_bad_public_base_url_is_refused_and_a_trailing_slash_dropped(monkeypatch):
    monkeypatch.setenv("CDS_PUBLIC_BASE_URL", "cds.example.org")
    with pytest.raises(ValidationError, match="must be an absolute http"):
        Settings()
    monkeypatch.setenv("CDS_PUBLIC_BASE_URL", f"{BASE}/")
    assert Settings().public_base_url == BASE


# --- hardening: headers and CORS -----------------------------------------------------------------------------


def test_security_headers_on_json_answers(app, signer, body):
    for resp in (
        app.test_client().get("/cds-services"),
        call(app, None, body),
        call(app, signer.rs384(), body),
    ):
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]


def test_cors_preflight_allows_authorization_on_service_endpoints_only(app):
    preflight = {
        "Origin": "https://sandbox.cds-hooks.org",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    for path in (SERVICE_URL, FEEDBACK_URL):
        pre = app.test_client().options(path, headers=preflight)
        assert pre.status_code in (200, 204)
        assert pre.headers["Access-Control-Allow-Origin"] == "*"
        assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Origin" not in app.test_client().get("/healthz").headers


def test_cors_origins_can_be_restricted(tmp_path, jwks_url):
    app = make_app(auth_settings(tmp_path, jwks_url, cors_origins=["https://sandbox.cds-hooks.org"]))
    ok = app.test_client().get("/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://sandbox.cds-hooks.org"
    assert "Origin" in ok.headers.get("Vary", "")
    other = app.test_client().get("/cds-services", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


# --- a slow or hostile JWKS endpoint: real sockets ------------------------------------------------------


def _jwks_bytes(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


@pytest.mark.slow
@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers"])
def test_a_trickling_jwks_is_a_401_within_8_s(tmp_path, rsa_key, ec_key, body, caplog, headers_too):
    # 1 byte a second: every read is quick, the whole would take a day. One 5 s deadline for all.
    with Peer() as jwks_endpoint:
        jwks_endpoint.behaviours = [trickle(jwks_endpoint.stop, headers_too=headers_too)]
        url = f"{jwks_endpoint.url}/jwks.json"
        app = make_app(auth_settings(tmp_path, url))
        caplog.set_level(logging.INFO)
        started = time.monotonic()
        assert_refused(call(app, Signer(url, rsa_key, ec_key).rs384(), body))
        seconds = time.monotonic() - started
    assert seconds < 8, seconds
    assert f"not read within {jwks.JWKS_TIMEOUT_S:g} s" in caplog.text


def _trickle_tls_handshake(stop: threading.Event) -> Callable[[Any], None]:
    """A "TLS server" that starts a 16 KiB handshake record and sends it a byte a second."""

    def behave(sock: Any) -> None:
        sock.sendall(b"\x16\x03\x03\x40\x00")  # handshake record, TLS 1.2, 16,384 bytes follow
        while not stop.wait(1.0):
            sock.sendall(b"\x00")

    return behave


@pytest.mark.slow
def test_a_jwks_endpoint_trickling_its_tls_handshake_is_a_401_within_8_s(tmp_path, rsa_key, ec_key, body):
    # The deadline covers the TLS handshake too: every read of OpenSSL's waits only for what is left.
    with Peer(read_request=False) as endpoint:
        endpoint.behaviours = [_trickle_tls_handshake(endpoint.stop)]
        url = f"https://127.0.0.1:{endpoint.port}/jwks.json"
        app = make_app(auth_settings(tmp_path, url))
        started = time.monotonic()
        assert_refused(call(app, Signer(url, rsa_key, ec_key).rs384(), body))
        assert time.monotonic() - started < 8


def test_a_jwks_host_whose_name_lookup_hangs_is_a_401_within_8_s(
    tmp_path, rsa_key, ec_key, body, caplog, monkeypatch
):
    """The system resolver takes no timeout of ours: the deadline covers the name lookup too.

    A DNS server that never answers is played by a getaddrinfo that blocks for this host only
    (the resolver is the one part of the fetch no socket of ours can stand in for)."""
    real_getaddrinfo = socket.getaddrinfo
    released = threading.Event()

    def hanging(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "jwks.unanswered.test":
            released.wait(30)
            raise socket.gaierror("gave up")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    url = "https://jwks.unanswered.test/jwks.json"
    app = make_app(auth_settings(tmp_path, url))
    started = time.monotonic()
    try:
        assert_refused(call(app, Signer(url, rsa_key, ec_key).rs384(), body))
        assert time.monotonic() - started < 8
        assert "not read within 5 s" in caplog.text
    finally:
        released.set()


@pytest.mark.slow
def test_while_a_refresh_trickles_other_callers_use_the_cache_and_the_cooldown_runs_from_its_end(
    tmp_path, rsa_key, ec_key, evil_key, body, monkeypatch
):
    with Peer() as endpoint:
        endpoint.behaviours = [respond(_jwks_bytes(jwk(rsa_key, RS_KID, "RS384"))), trickle(endpoint.stop)]
        url = f"{endpoint.url}/jwks.json"
        app = make_app(auth_settings(tmp_path, url))
        signer = Signer(url, rsa_key, ec_key)
        assert call(app, signer.rs384(), body).status_code == 200  # keys fetched and cached
        # Once the cooldown is over, a forged kid makes one caller refresh; the endpoint now trickles.
        monkeypatch.setattr(jwks, "JWKS_REFRESH_COOLDOWN_S", 2.0)
        time.sleep(2.1)
        forged: dict[str, Any] = {}

        def forged_call() -> None:
            started = time.monotonic()
            forged["status"] = call(app, signer.rs384(evil_key, "forged-kid"), body).status_code
            forged["seconds"] = time.monotonic() - started

        thread = threading.Thread(target=forged_call)
        thread.start()
        time.sleep(0.5)
        assert endpoint.connections == 2  # the refresh is under way
        for _ in range(5):  # meanwhile, genuine callers: served from the cache, not queued
            started = time.monotonic()
            assert call(app, signer.rs384(), body).status_code == 200
            assert time.monotonic() - started < 1.5
        thread.join(15)
        assert forged == {"status": 401, "seconds": pytest.approx(jwks.JWKS_TIMEOUT_S, abs=1.5)}
        # The 2 s cooldown counts from the end of that 5 s fetch: forged kids now cost nothing...
        for _ in range(5):
            assert_refused(call(app, signer.rs384(evil_key, "forged-kid"), body))
        assert endpoint.connections == 2
        # ...and once it is over, one more attempt.
        time.sleep(2.1)
        endpoint.behaviours = [respond(_jwks_bytes(jwk(rsa_key, RS_KID, "RS384")))]
        assert_refused(call(app, signer.rs384(evil_key, "forged-kid"), body))
        assert endpoint.connections == 3


@pytest.mark.slow
def test_many_forged_kids_at_once_cost_one_fetch(tmp_path, rsa_key, ec_key, evil_key, body):
    with Peer() as endpoint:
        endpoint.behaviours = [respond(_jwks_bytes(jwk(rsa_key, RS_KID, "RS384")))]
        url = f"{endpoint.url}/jwks.json"
        app = make_app(auth_settings(tmp_path, url))
        signer = Signer(url, rsa_key, ec_key)
        tokens = [signer.rs384(evil_key, f"forged-{i}") for i in range(12)]
        threads = [threading.Thread(target=call, args=(app, t, body)) for t in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert endpoint.connections == 1

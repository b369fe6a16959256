"""Client authentication: the CDS Hooks 2.0 client JWT, verified without Flask (web/auth.py adapts it).

The EHR signs a short-lived JWT with its private key and sends it as `Authorization: Bearer` on
every hook and feedback call. We trust a key only through configuration: `CDS_TRUSTED_ISSUERS`
maps each trusted `iss` to its JWKS URL. URLs found in a token (`jku`) are compared with that,
never fetched, so a token cannot point us at an attacker's keys (or at anything else).

The unverified header and claims are read only to pick the issuer and the key; every decision
about the token is made by PyJWT on the verified token. Each failure is one generic 401 for the
client; the log says which check failed, with `iss` and `jti`, never the token.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWKClient, PyJWKClientConnectionError
from sqlalchemy.exc import SQLAlchemyError

from cds_service.store.database import Store

log = logging.getLogger("cds_service.auth")  # the name operators filter on, kept across the move

GENERIC_401 = "authentication failed"

# The two algorithms CDS Hooks 2.0 names. Everything else — `none`, HS* (a public key used as an
# HMAC secret), RS256, PS*, EdDSA — is refused before any key is looked at.
ALGORITHMS = ("ES384", "RS384")
LEEWAY_S = 60  # clock skew tolerated on exp and iat
REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti"]  # all REQUIRED in CDS Hooks 2.0
MAX_TOKEN_CHARS = 16 * 1024  # real client JWTs are < 2 KiB; don't parse megabytes of header
MAX_JTI_CHARS = 255
MIN_RSA_BITS = 2048
# JWKS fetching: cached for JWKS_LIFESPAN_S; an unknown kid forces a refetch (key rotation), at
# most once per cooldown so forged kids cannot make us hammer the EHR. Each fetch is bounded.
JWKS_LIFESPAN_S = 300.0
JWKS_REFRESH_COOLDOWN_S = 30.0
JWKS_TIMEOUT_S = 5.0
JWKS_MAX_BYTES = 256 * 1024
# Far enough for any real token, small enough for every datetime and database column.
_MAX_EPOCH_S = 253_402_300_799  # 9999-12-31T23:59:59Z


class Refused(Exception):
    """One failed check. `reason` is for the log only, never for the client."""

    def __init__(self, reason: str, level: int = logging.INFO) -> None:
        super().__init__(reason)
        self.reason = reason
        self.level = level


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The JWKS URL is configured; a redirect would let whoever answers there choose another one.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class BoundedJWKClient(PyJWKClient):
    """PyJWKClient whose fetch is bounded in time (total, not per read) and size, never redirected,
    and done at most once per cooldown, successful or not. PyJWKClient refetches on every unknown
    kid, and a forged token's kid is the attacker's choice: without the cooldown each forged call
    would cost a request to the EHR, and while the EHR is down a 5 s wait (older PyJWT has none)."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri, cache_jwk_set=True, lifespan=JWKS_LIFESPAN_S, timeout=JWKS_TIMEOUT_S)
        self.cooldown_duration = 0.0  # newer PyJWT's own cooldown: ours (fetch_data) is the one rule
        self._fetch_lock = threading.Lock()
        self._last_at: float | None = None
        self._last: dict[str, Any] | str | None = None  # the JWKS, or why it could not be fetched

    def fetch_data(self) -> Any:
        with self._fetch_lock:  # concurrent calls with a new kid: one fetch, the others reuse it
            now = time.monotonic()
            if self._last_at is None or now - self._last_at >= JWKS_REFRESH_COOLDOWN_S:
                try:
                    self._last = self._fetch()
                except PyJWKClientConnectionError as exc:
                    self._last = str(exc)
                self._last_at = now
            last = self._last
        if not isinstance(last, dict):
            raise PyJWKClientConnectionError(last or "no JWKS")
        if self.jwk_set_cache is not None:
            self.jwk_set_cache.put(last)  # what PyJWKClient.fetch_data does on success
        return last

    def _fetch(self) -> dict[str, Any]:
        request = urllib.request.Request(self.uri, headers={"Accept": "application/json", **self.headers})
        deadline = time.monotonic() + JWKS_TIMEOUT_S
        try:
            with urllib.request.build_opener(_NoRedirect()).open(request, timeout=JWKS_TIMEOUT_S) as response:
                body = bytearray()
                while chunk := response.read(16 * 1024):
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        raise ValueError(f"JWKS larger than {JWKS_MAX_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"JWKS not read within {JWKS_TIMEOUT_S:g} s")
            data = json.loads(body)
        except (OSError, ValueError) as exc:  # URLError/HTTPError/timeouts are OSErrors; JSON is ValueError
            raise PyJWKClientConnectionError(
                f"cannot fetch {self.uri}: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(data, dict):
            raise PyJWKClientConnectionError(f"{self.uri} did not answer a JSON object")
        return data


@dataclass
class ClientAuth:
    """The trusted issuers and their JWKS clients (one per app: keys cached between calls)."""

    issuers: Mapping[str, str]  # iss -> JWKS URL
    public_base_url: str | None = None
    _clients: dict[str, PyJWKClient] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._clients = {iss: BoundedJWKClient(url) for iss, url in self.issuers.items()}

    def audiences(self, url_root: str, path: str, feedback: bool) -> list[str]:
        """The `aud` values accepted for this call: the URL called.

        On feedback also the service's own URL: the feedback endpoint belongs to the service, and
        clients differ in which of the two they name (the replay check keeps either single-use).
        """
        base = (self.public_base_url or url_root).rstrip("/")
        called = base + path
        if feedback:
            return [called, called.removesuffix("/feedback")]
        return [called]

    def verify(self, token: str, audiences: list[str], store: Store) -> dict[str, Any]:
        """The verified claims of `token`, its jti now spent; `Refused` naming the failed check."""
        header, unverified = _peek(token)
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Refused(f"algorithm {_short(alg)} not allowed")
        iss = unverified.get("iss")
        if not isinstance(iss, str) or iss not in self.issuers:
            raise Refused("untrusted iss")
        if "jku" in header and header["jku"] != self.issuers[iss]:
            raise Refused(f"jku {_short(header['jku'])} is not the issuer's JWKS URL")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Refused("no kid in the header")
        key = self._key(iss, kid, alg)
        claims = _decode(token, key, alg, audiences, iss)
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise Refused(f"jti not a string of 1 to {MAX_JTI_CHARS} characters")
        # Kept until the token can no longer pass the exp check; then a replay fails on exp anyway.
        expires = dt.datetime.fromtimestamp(min(int(claims["exp"]) + LEEWAY_S, _MAX_EPOCH_S), dt.UTC)
        try:
            first_use = store.claim_jti(jti, iss, expires)
        except SQLAlchemyError as exc:  # fail closed: without the replay check the token is not enough
            raise Refused(f"cannot record the jti ({type(exc).__name__})", logging.ERROR) from None
        if not first_use:
            raise Refused("replayed jti")
        return claims

    def _key(self, iss: str, kid: str, alg: str) -> Any:
        """The issuer's public key `kid`, checked to fit `alg` (a JWK's own `alg` is optional)."""
        try:
            key = self._clients[iss].get_signing_key(kid).key
        except PyJWKClientConnectionError as exc:
            raise Refused(f"the issuer's JWKS is unavailable: {exc}", logging.WARNING) from None
        except jwt.PyJWTError as exc:  # unknown kid even after a refresh, or a JWKS without usable keys
            raise Refused(
                f"kid {_short(kid)} not found in the issuer's JWKS ({type(exc).__name__})"
            ) from None
        if alg == "RS384" and isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
            return key
        if alg == "ES384" and isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1":
            return key
        raise Refused(f"key {_short(kid)} does not fit {alg}")


# PyJWT's verdicts, as log reasons (the exception texts are PyJWT's, but fixed words are safer).
_DECODE_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "expired (exp)"),
    (jwt.ImmatureSignatureError, "issued in the future (iat) or not yet valid (nbf)"),
    (jwt.InvalidAudienceError, "aud is not this endpoint's URL"),
    (jwt.InvalidIssuerError, "iss does not match"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidIssuedAtError, "iat is not a number"),
)


def _decode(token: str, key: Any, alg: str, audiences: list[str], iss: str) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=audiences,
            issuer=iss,
            leeway=LEEWAY_S,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.MissingRequiredClaimError as exc:
        raise Refused(f"no {exc.claim} claim") from None
    except jwt.PyJWTError as exc:
        reason = next((r for cls, r in _DECODE_REASONS if isinstance(exc, cls)), type(exc).__name__)
        raise Refused(reason) from None


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims before any verification: only to choose the issuer and the key."""
    if len(token) > MAX_TOKEN_CHARS:
        raise Refused(f"token longer than {MAX_TOKEN_CHARS} characters")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, RecursionError):  # deeply nested JSON: only newer PyJWT wraps that
        raise Refused("not a JWT") from None
    return header, claims


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer` header value; `Refused` naming what is wrong otherwise."""
    scheme, _, token = authorization.strip().partition(" ")
    if not scheme:
        raise Refused("no Authorization header")
    if scheme.lower() != "bearer":
        raise Refused(f"Authorization scheme {_short(scheme)} is not Bearer")
    if not token.strip():
        raise Refused("empty Bearer token")
    return token.strip()


def _short(value: Any) -> str:
    """An attacker-chosen value, made safe for one log line."""
    return repr(value)[:80]


def ids_for_log(token: str) -> tuple[str, str]:
    """The token's iss and jti (unverified, as claimed) to say in the log which call failed."""
    try:
        claims = (
            jwt.decode(token, options={"verify_signature": False}) if len(token) <= MAX_TOKEN_CHARS else {}
        )
    except (jwt.PyJWTError, RecursionError):
        claims = {}
    return _short(claims.get("iss")), _short(claims.get("jti"))

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
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds_service.hooks.jwks import IssuerKeys, KeysUnavailable, UnknownKid
from cds_service.store.database import Store
from cds_service.store.schema import StoreDown

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
# The longest a token may live (exp - iat) and the oldest iat accepted, by default: CDS Hooks asks
# for short-lived tokens (a 5-minute expiry is recommended); an hour is generous. The jti store keeps
# each id until its token expires, so a bound here bounds how long it keeps them.
DEFAULT_MAX_AGE_S = 3600
# Far enough for any real token, small enough for every datetime and database column.
_MAX_EPOCH_S = 253_402_300_799  # 9999-12-31T23:59:59Z


class Refused(Exception):
    """One failed check. `reason` is for the log only, never for the client."""

    def __init__(self, reason: str, level: int = logging.INFO) -> None:
        super().__init__(reason)
        self.reason = reason
        self.level = level


@dataclass
class ClientAuth:
    """The trusted issuers and their JWKS clients (one per app: keys cached between calls)."""

    issuers: Mapping[str, str]  # iss -> JWKS URL
    public_base_url: str | None = None
    max_age_s: float = DEFAULT_MAX_AGE_S  # longest token lifetime, oldest iat (CDS_JWT_MAX_AGE_S)
    _keys: dict[str, IssuerKeys] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._keys = {iss: IssuerKeys(url) for iss, url in self.issuers.items()}

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
        self._check_times(unverified)  # before any key is fetched: a bad token costs nothing
        key = self._key(iss, kid, alg)
        claims = _decode(token, key, alg, audiences, iss)
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise Refused(f"jti not a string of 1 to {MAX_JTI_CHARS} characters")
        # Kept until the token can no longer pass the exp check; then a replay fails on exp anyway.
        expires = dt.datetime.fromtimestamp(min(int(claims["exp"]) + LEEWAY_S, _MAX_EPOCH_S), dt.UTC)
        try:
            first_use = store.claim_jti(jti, iss, expires)
        except StoreDown as exc:  # fail closed: without the replay check the token is not enough
            raise Refused(f"cannot record the jti ({str(exc).split(':')[0]})", logging.ERROR) from None
        if not first_use:
            raise Refused("replayed jti")
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        """exp and iat are NumericDates (JSON numbers, not strings) within max_age_s.

        PyJWT reads `"exp": "1999999999"` as a number and accepts any lifetime; both are refused
        here. PyJWT still checks exp against now and iat against the future, on the verified token.
        """
        for name in ("exp", "iat"):
            value = claims.get(name)
            if value is None:
                raise Refused(f"no {name} claim")
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise Refused(f"{name} is not a number")
        exp, iat = claims["exp"], claims["iat"]
        if exp - iat > self.max_age_s:
            raise Refused(f"token lifetime (exp - iat) over {self.max_age_s:g} s")
        if time.time() - iat > self.max_age_s + LEEWAY_S:
            raise Refused(f"iat more than {self.max_age_s:g} s ago")

    def _key(self, iss: str, kid: str, alg: str) -> Any:
        """The issuer's public key `kid`, checked to fit `alg` (a JWK's own `alg` is optional)."""
        try:
            key = self._keys[iss].key(kid).key
        except KeysUnavailable as exc:
            raise Refused(f"the issuer's JWKS is unavailable: {exc}", logging.WARNING) from None
        except UnknownKid:
            raise Refused(f"kid {_short(kid)} not found in the issuer's JWKS") from None
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

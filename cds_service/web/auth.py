"""The client-JWT check as the Flask app uses it: one ClientAuth per app, one call per request.

The checks themselves live in `hooks/client_jwt.py` and know nothing of Flask.
"""

from __future__ import annotations

import logging

from flask import Flask, Request, current_app

from cds_service.errors import Unauthorized
from cds_service.hooks.client_jwt import GENERIC_401, ClientAuth, Refused, bearer_token, ids_for_log
from cds_service.settings import Settings

log = logging.getLogger("cds_service.auth")  # one logger name for every client-JWT line

_EXTENSION = "cds.auth"


def init_app(app: Flask, settings: Settings) -> None:
    """The issuers' JWKS clients for this app, and a loud word when calls go unauthenticated."""
    app.extensions[_EXTENSION] = ClientAuth(
        settings.trusted_issuers, settings.public_base_url, settings.jwt_max_age_s
    )
    if not settings.auth_required:
        log.warning(
            "CDS_AUTH_REQUIRED=false: hook and feedback calls are answered WITHOUT client JWT checks%s",
            " (demo mode)" if settings.demo else "; use this only on a trusted network",
        )
    elif not settings.fhir_server_allowlist:
        # Any EHR that holds a trusted key could point the service at any https server it likes.
        log.warning(
            "CDS_FHIR_SERVER_ALLOWLIST is not set: hook calls may name any fhirServer (https, or "
            "loopback); list each EHR's FHIR base URLs, per issuer if you trust several"
        )
    if settings.auth_required and not settings.trusted_issuers:
        log.warning("CDS_TRUSTED_ISSUERS is empty: every hook and feedback call will be refused (401)")
    elif settings.auth_required and not settings.public_base_url:
        log.warning(
            "CDS_PUBLIC_BASE_URL is not set: the JWT aud is checked against the URL of each request "
            "(its Host header); set it to the URL EHRs call, certainly behind a proxy"
        )


def authenticate(request: Request, settings: Settings) -> str | None:
    """Raise Unauthorized (one generic message) unless the call carries a valid client JWT.

    Returns the token's issuer (None with auth off): it chooses the fhirServer allowlist.
    """
    if not settings.auth_required:
        return None
    client_auth: ClientAuth = current_app.extensions[_EXTENSION]
    token = ""
    try:
        token = bearer_token(request.headers.get("Authorization", ""))
        claims = client_auth.verify(
            token,
            client_auth.audiences(request.url_root, request.path, request.endpoint == "cds.feedback"),
            current_app.extensions["cds.store"],
        )
    except Refused as refused:
        iss, jti = ids_for_log(token) if token else ("None", "None")
        log.log(refused.level, "client JWT refused: %s (iss=%s, jti=%s)", refused.reason, iss, jti)
        raise Unauthorized(GENERIC_401) from None
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else None

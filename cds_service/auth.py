"""Client authentication (CDS Hooks 2.0 client JWT).

Until JWT verification lands (issue 5), a service that requires authentication refuses every
hook call rather than answering unauthenticated clients: the safe default.
"""

from __future__ import annotations

import logging

from flask import Request

from .errors import Unauthorized
from .settings import Settings

log = logging.getLogger(__name__)

GENERIC_401 = "authentication failed"


def authenticate(request: Request, settings: Settings) -> None:
    if not settings.auth_required:
        return
    log.warning("client JWT verification is not available: refusing (set CDS_AUTH_REQUIRED=false to test)")
    raise Unauthorized(GENERIC_401)

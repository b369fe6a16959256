"""Where the service may send a FHIR request and with what: fhirServer, token and origin rules.

The bearer token the EHR gives us is only ever sent to `fhirServer`'s origin; these checks run
before any request leaves the process.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from cds_service.errors import FetchError, PrefetchInvalid
from cds_service.settings import Settings
from cds_service.urls import is_loopback


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in; port -1 when invalid."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def under(url: str, base: str) -> bool:
    """Is `url` the base URL `base` or below it (path-segment aware)?"""
    if origin(url) != origin(base):
        return False
    path, base_path = urlsplit(url).path.rstrip("/"), urlsplit(base.strip()).path.rstrip("/")
    return path == base_path or path.startswith(base_path + "/")


def check_fhir_server(url: str | None, settings: Settings) -> str:
    """Validate the EHR-given fhirServer base URL; return it normalised (no trailing slash)."""
    if not url or not url.strip():
        raise FetchError("The request has no fhirServer, so the missing prefetch cannot be fetched")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise FetchError("fhirServer is not an http(s) URL", issue_code="invalid")
    if parts.username or parts.password:
        # Do not echo it: the URL itself carries credentials.
        raise FetchError("fhirServer must not carry credentials in the URL", issue_code="security")
    if origin(url)[2] == -1:
        raise FetchError("fhirServer has an invalid port", issue_code="invalid")
    if parts.query or parts.fragment:
        raise FetchError("fhirServer must be a FHIR base URL without query or fragment", issue_code="invalid")
    normalised = f"{scheme}://{parts.netloc.lower()}{parts.path.rstrip('/')}"
    if scheme == "http" and not is_loopback(parts.hostname) and not settings.allow_insecure_fhir:
        raise FetchError(
            f"fhirServer {normalised} uses plain http; https is required except on loopback "
            "(or set CDS_ALLOW_INSECURE_FHIR=true)",
            issue_code="security",
        )
    allowlist = settings.fhir_server_allowlist
    if allowlist and not any(under(normalised, allowed) for allowed in allowlist):
        raise FetchError(
            f"fhirServer {normalised} is not in CDS_FHIR_SERVER_ALLOWLIST", issue_code="security"
        )
    return normalised


def check_token(token: str | None) -> None:
    # A token with spaces or control characters would make requests raise an error quoting it.
    if token is not None and (not token or any(not 33 <= ord(c) <= 126 for c in token)):
        raise PrefetchInvalid("fhirAuthorization.access_token is not a valid bearer token")

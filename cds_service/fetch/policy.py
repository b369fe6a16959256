"""Where the service may send a FHIR request and with what: fhirServer, token and origin rules.

The bearer token the EHR gives us is only ever sent to `fhirServer`'s origin; these checks run
before any request leaves the process.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import quote, unquote, urlsplit

from cds_service.errors import FetchError, PrefetchInvalid
from cds_service.settings import Settings
from cds_service.urls import is_loopback

# Never a FHIR server: link-local addresses (where cloud providers answer instance-metadata requests
# with credentials) and the other well-known metadata endpoints.
_FORBIDDEN_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32")
)
_FHIR_ID = re.compile(r"[A-Za-z0-9.-]{1,64}")


def forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Link-local or cloud-metadata, also in an IPv4-mapped or -compatible IPv6 form."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.packed[:12] == bytes(12) and int(address) > 1:
            embedded = ipaddress.IPv4Address(address.packed[12:])  # ::a.b.c.d (deprecated, still routed)
        if embedded is not None and forbidden_address(embedded):
            return True
    return any(address in net for net in _FORBIDDEN_NETS if net.version == address.version)


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host written as a number means, in every form a resolver accepts
    (dotted, decimal `2852039166`, hex `0xa9fea9fe`, octal, short `169.254.43518`)."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def check_patient_id(patient_id: str) -> str:
    """context.patientId must be a FHIR id; returned URL-encoded (a no-op for a valid id, kept so
    that every query is built from the encoded form)."""
    if not isinstance(patient_id, str) or not _FHIR_ID.fullmatch(patient_id):
        raise PrefetchInvalid("context.patientId is not a FHIR id ([A-Za-z0-9.-], 1 to 64 characters)")
    return quote(patient_id, safe="")


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


def check_fhir_server(url: str | None, settings: Settings, issuer: str | None = None) -> str:
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
    literal = _literal_address(parts.hostname)
    if literal is not None and forbidden_address(literal):
        raise FetchError("fhirServer is a link-local or metadata address: refused", issue_code="security")
    normalised = f"{scheme}://{parts.netloc.lower()}{parts.path.rstrip('/')}"
    if scheme == "http" and not is_loopback(parts.hostname) and not settings.allow_insecure_fhir:
        raise FetchError(
            f"fhirServer {normalised} uses plain http; https is required except on loopback "
            "(or set CDS_ALLOW_INSECURE_FHIR=true)",
            issue_code="security",
        )
    allowlist = settings.fhir_servers_for(issuer)
    if allowlist is not None and not any(under(normalised, allowed) for allowed in allowlist):
        raise FetchError(
            f"fhirServer {normalised} is not in CDS_FHIR_SERVER_ALLOWLIST", issue_code="security"
        )
    return normalised


def check_token(token: str | None) -> None:
    # A token with spaces or control characters would make requests raise an error quoting it.
    if token is not None and (not token or any(not 33 <= ord(c) <= 126 for c in token)):
        raise PrefetchInvalid("fhirAuthorization.access_token is not a valid bearer token")


def next_page_url(url: str, base: str) -> str | None:
    """Where to fetch a next-page link from, or None when it must not be followed.

    A link under fhirServer's base path is fetched from fhirServer's own origin, whatever origin it
    names: servers that call themselves `localhost` while reached as 127.0.0.1, or that sit behind
    a port mapping, write their links on the origin they believe they have. The token therefore
    only ever goes to fhirServer's origin, and only under its base path.
    """
    parts, home = urlsplit(url), urlsplit(base)
    if parts.scheme.lower() not in ("http", "https") or parts.username or parts.password:
        return None
    base_path = home.path.rstrip("/")
    path = parts.path
    if ".." in unquote(path).split("/"):
        return None  # a dot segment would climb out of the base path once the server normalises it
    if not (path.rstrip("/") == base_path or path.startswith(base_path + "/")):
        return None
    return f"{home.scheme}://{home.netloc}{path}" + (f"?{parts.query}" if parts.query else "")

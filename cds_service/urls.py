"""URL facts shared by configuration checks and the outbound FHIR client."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """localhost, *.localhost or a loopback IP: the only hosts plain http may reach."""
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_url(host: str, port: int | str) -> str:
    """`http://HOST:PORT` for a server listening there; bound to every interface (0.0.0.0, ::),
    it is reached on loopback, one of them."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        host = "::1" if address.version == 6 else "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"

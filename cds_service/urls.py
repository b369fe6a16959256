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

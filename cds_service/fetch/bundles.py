"""A prefetch value, read: each Bundle's resources by type, or a clear 400 when it is not FHIR.

This is where what the EHR sent is checked before the clinical core sees it (the core trusts the
shape it is given and raises nothing of the web's).
"""

from __future__ import annotations

from typing import Any

from cds_service.errors import PrefetchInvalid


def check_shape(key: str, value: dict[str, Any], is_search: bool) -> dict[str, list[dict[str, Any]]] | None:
    """The Bundle's resources by type (None for a plain resource); PrefetchInvalid when it is not FHIR."""
    rtype = value["resourceType"]
    if is_search and rtype != "Bundle":
        raise PrefetchInvalid(f"prefetch {key!r} must be a searchset Bundle, not {rtype}")
    if not is_search and rtype not in ("Patient", "Bundle"):
        raise PrefetchInvalid(f"prefetch {key!r} must be a Patient, not {rtype}")
    return bundle_resources(value, key) if rtype == "Bundle" else None


def bundle_resources(bundle: dict[str, Any], key: str = "bundle") -> dict[str, list[dict[str, Any]]]:
    """The resources of a Bundle's entries by resourceType; PrefetchInvalid when the Bundle is not FHIR.

    Grouped in the same pass that checks them: each resource is read while it is in the CPU cache.
    """
    entries = bundle.get("entry") or []
    if type(entries) is not list:
        raise PrefetchInvalid(f"prefetch {key!r}: Bundle.entry is not a list")
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if type(entry) is not dict:
            raise PrefetchInvalid(f"prefetch {key!r}: a Bundle entry is not an object")
        resource = entry.get("resource")
        if resource is None:
            continue
        rtype = resource.get("resourceType") if type(resource) is dict else None
        if type(rtype) is not str:
            raise PrefetchInvalid(
                f"prefetch {key!r}: a Bundle entry holds something that is not a FHIR resource"
            )
        if rtype == "OperationOutcome":
            continue  # a warning a server adds to a searchset (search.mode "outcome"), never chart data
        group = by_type.get(rtype)
        if group is None:
            group = by_type[rtype] = []
        group.append(resource)
    return by_type

"""One patient's chart: the FHIR resources the hook call brought or fetched, by type.

Building a chart is where foreign data is dropped (clinical-logic §8.17): a resource whose
subject / patient is another patient is never used, only counted and logged without PHI.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest

log = logging.getLogger(__name__)

# Where each resource type names its patient.
_PATIENT_FIELDS = ("subject", "patient")


@dataclass
class Chart:
    patient_id: str
    patient: dict[str, Any] | None = None
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    foreign_dropped: int = 0

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return self.resources.get(resource_type, [])

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.resources.values())


def bundle_resources(bundle: dict[str, Any], key: str = "bundle") -> list[dict[str, Any]]:
    """The resources of a Bundle's entries; BadRequest when the Bundle is not FHIR."""
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest(f"prefetch {key!r}: Bundle.entry is not a list")
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise BadRequest(f"prefetch {key!r}: a Bundle entry is not an object")
        resource = entry.get("resource")
        if resource is None:
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise BadRequest(f"prefetch {key!r}: a Bundle entry holds something that is not a FHIR resource")
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue  # OperationOutcome warnings a server adds to a searchset
        out.append(resource)
    return out


def patient_references(patient_id: str, full_url: str | None = None) -> frozenset[str]:
    refs = {f"Patient/{patient_id}", f"urn:uuid:{patient_id}"}
    if full_url:
        refs.add(full_url)
    return frozenset(refs)


def belongs_to(resource: dict[str, Any], refs: frozenset[str], patient_id: str) -> bool:
    """True unless the resource names another patient. A resource naming no patient is kept."""
    for name in _PATIENT_FIELDS:
        ref = resource.get(name)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            reference = ref["reference"].split("/_history/")[0]
            return reference in refs or reference.endswith(f"/Patient/{patient_id}")
    return True


def build_chart(
    patient_id: str,
    patient: dict[str, Any] | None,
    resources: Iterable[dict[str, Any]],
    patient_full_url: str | None = None,
) -> Chart:
    refs = patient_references(patient_id, patient_full_url)
    chart = Chart(patient_id=patient_id)
    if patient is not None and patient.get("resourceType") == "Patient":
        if patient.get("id") in (None, patient_id):
            chart.patient = patient
        else:
            chart.foreign_dropped += 1
    seen: set[tuple[str, str]] = set()
    for resource in resources:
        rtype = resource["resourceType"]
        if rtype in ("Patient", "OperationOutcome", "Bundle"):
            continue
        if not belongs_to(resource, refs, patient_id):
            chart.foreign_dropped += 1
            continue
        rid = resource.get("id")
        if isinstance(rid, str):
            if (rtype, rid) in seen:
                continue  # the same resource from two searches
            seen.add((rtype, rid))
        chart.resources.setdefault(rtype, []).append(resource)
    if chart.foreign_dropped:
        # An EHR data error worth knowing about; the count only, never the data (no PHI in logs).
        log.warning("ignored %d resource(s) belonging to another patient", chart.foreign_dropped)
    return chart

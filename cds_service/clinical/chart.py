"""One patient's chart: the FHIR resources the hook call brought or fetched, by type.

Building a chart is where foreign data is dropped (docs/clinical-rules.md §8.17): a resource whose
subject / patient is another patient is never used, only counted and logged without PHI.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("cds_service.chart")  # the name operators filter on, kept across the move

# Where each resource type names its patient.
_PATIENT_FIELDS = ("subject", "patient")


@dataclass
class Chart:
    """Resources by type. Whether a resource may be used is decided only for the ones the clinical
    core picks (`claim`), so a large chart of unrelated data costs one pass of grouping."""

    patient_id: str
    patient: dict[str, Any] | None = None
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    foreign_dropped: int = 0
    patient_full_url: str | None = None
    # Resource types the EHR's FHIR server would not give (an optional search refused or out of
    # time): "no data of that kind", which the clinical core must not read as "none in the chart".
    unread: frozenset[str] = frozenset()
    _verdicts: dict[int, bool] = field(default_factory=dict, repr=False)
    _seen: set[tuple[str, str]] = field(default_factory=set, repr=False)
    # The references that name this patient, built on the first claim rather than on every one.
    _refs: frozenset[str] | None = field(default=None, repr=False, compare=False)

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return self.resources.get(resource_type, [])

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.resources.values())

    def claim(self, resource: dict[str, Any]) -> bool:
        """True when the resource is this patient's and not a duplicate of one already claimed."""
        verdict = self._verdicts.get(id(resource))
        if verdict is None:
            verdict = self._decide(resource)
            self._verdicts[id(resource)] = verdict
        return verdict

    def _decide(self, resource: dict[str, Any]) -> bool:
        if self._refs is None:
            self._refs = patient_references(self.patient_id, self.patient_full_url)
        if not belongs_to(resource, self._refs, self.patient_id):
            self.foreign_dropped += 1
            # An EHR data error worth knowing about; never the data itself (no PHI in logs).
            log.warning("ignored a %s that belongs to another patient", resource.get("resourceType"))
            return False
        rid = resource.get("id")
        if isinstance(rid, str):
            key = (resource["resourceType"], rid)
            if key in self._seen:
                return False  # the same resource from two searches
            self._seen.add(key)
        return True


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
    groups: Iterable[Mapping[str, list[dict[str, Any]]]],
    patient_full_url: str | None = None,
) -> Chart:
    """The chart of resources grouped by type (`{resourceType: [resource, ...]}`), merged in order."""
    chart = Chart(patient_id=patient_id, patient_full_url=patient_full_url)
    if patient is not None and patient.get("resourceType") == "Patient":
        if patient.get("id") in (None, patient_id):
            chart.patient = patient
        else:
            chart.foreign_dropped += 1
            log.warning("ignored a Patient resource that is not the context patient")
    merged = chart.resources
    for group in groups:
        for rtype, resources in group.items():
            bucket = merged.get(rtype)
            if bucket is None:
                merged[rtype] = list(resources)
            else:
                bucket.extend(resources)
    return chart

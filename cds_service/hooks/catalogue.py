"""The CDS services we offer: id, hook, title, description and prefetch templates."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, cached_property

from cds_service.clinical.knowledge.terminology import terminology
from cds_service.hooks.models import DiscoveryService

_TOKEN = re.compile(r"\{\{\s*([^}]+?)\s*\}\}")


@dataclass(frozen=True)
class Service:
    id: str
    hook: str
    title: str
    description: str
    prefetch: dict[str, str]

    def discovery(self) -> DiscoveryService:
        return DiscoveryService(
            hook=self.hook, id=self.id, title=self.title, description=self.description, prefetch=self.prefetch
        )

    def key_for(self, resource_type: str) -> str | None:
        """The search key that brings resources of this type (directly, or by _include)."""
        for key, template in self.prefetch.items():
            if "?" in template and template.split("?", 1)[0] == resource_type:
                return key
        for key, template in self.prefetch.items():
            if f":{resource_type.lower()}" in template.lower() and "_include=" in template:
                return key
        return None

    @cached_property  # read for every prefetch key of every call: computed once per service
    def search_keys(self) -> tuple[str, ...]:
        return tuple(k for k, t in self.prefetch.items() if "?" in t)


def fill_template(template: str, context: dict[str, str | None]) -> str | None:
    """A prefetch template with its tokens filled; None when a token has no value."""
    missing = False

    def sub(match: re.Match[str]) -> str:
        nonlocal missing
        value = context.get(match.group(1))
        if not value:
            missing = True
            return ""
        return value

    filled = _TOKEN.sub(sub, template)
    return None if missing else filled


@cache
def services() -> dict[str, Service]:
    codes = ",".join(f"{system}|{code}" for system, code in terminology().observation_codes)
    patient_view = Service(
        id="crc-metastases",
        hook="patient-view",
        title="Colorectal cancer metastases: recurrence risk and neoadjuvant therapy",
        description=(
            "For colorectal cancer with lung or liver metastases: derives the published recurrence risk "
            "factors (CEA, disease-free interval, nodal status, extrapulmonary disease) from the chart and "
            "recommends an MDT evaluation of neoadjuvant therapy or upfront local therapy, with evidence."
        ),
        prefetch={
            "patient": "Patient/{{context.patientId}}",
            "conditions": "Condition?patient={{context.patientId}}",
            "observations": f"Observation?patient={{{{context.patientId}}}}&code={codes}",
            "procedures": "Procedure?patient={{context.patientId}}",
            # mCODE Tumor BodyStructures: one per lesion (liver lesion count).
            "bodystructures": "BodyStructure?patient={{context.patientId}}",
            # Systemic therapy (treatment state, CEA rule §8.4); _include brings referenced Medications.
            "medicationrequests": "MedicationRequest?patient={{context.patientId}}&_include=MedicationRequest:medication",
            "medicationadministrations": (
                "MedicationAdministration?patient={{context.patientId}}&_include=MedicationAdministration:medication"
            ),
            "medicationstatements": (
                "MedicationStatement?patient={{context.patientId}}&_include=MedicationStatement:medication"
            ),
            # Planned lung ablation / SBRT.
            "servicerequests": "ServiceRequest?patient={{context.patientId}}",
        },
    )
    return {patient_view.id: patient_view}

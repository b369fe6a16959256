"""mCODE Tumor BodyStructures (one per lesion) and TumorSize Observations."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.bodystructure import BodyStructure
from fhir.resources.R4B.observation import Observation

from cds_service.clinical.chart import Chart
from cds_service.clinical.facts.dates import observation_date, observation_date_last
from cds_service.clinical.facts.model import PatientFacts, Tumor, TumorSize
from cds_service.clinical.facts.rawjson import measured_number
from cds_service.clinical.facts.validation import validated
from cds_service.clinical.fhir_fields import codings, raw_codings, ref_of, reference_targets
from cds_service.clinical.knowledge.terminology import Terminology

# mCODE Tumor.relatedCondition uses the core extension (terminology.md marks the URL unverified).
_RELATED_CONDITION_URLS = {
    "http://hl7.org/fhir/StructureDefinition/condition-related",
    "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-related-condition",
}

_CM_PER_UNIT = {"cm": 1.0, "mm": 0.1}


def tumor_size(raw: dict[str, Any], facts: PatientFacts, term: Terminology) -> TumorSize | None:
    """mCODE TumorSize: the longest dimension (component 33728-7), in cm."""
    observation = validated(Observation, raw, facts)
    if observation is None or observation.status not in term.tnm_statuses:
        return None
    index = next(
        (
            i
            for i, c in enumerate(observation.component or [])
            if term.tumor_longest_dimension.any(codings(c.code)) and c.valueQuantity is not None
        ),
        None,
    )
    quantity = observation.valueQuantity if index is None else observation.component[index].valueQuantity
    if quantity is None or quantity.value is None:
        return None
    # The number as the chart wrote it: the model would also take "7.5" (a string) or a negative size.
    raw_quantity = raw.get("valueQuantity") if index is None else raw["component"][index].get("valueQuantity")
    size = measured_number(raw_quantity.get("value") if type(raw_quantity) is dict else None)
    unit = quantity.code or quantity.unit
    factor = _CM_PER_UNIT.get(unit or "")
    if factor is None or not size:
        return None  # mCODE allows only mm and cm; a size is a positive number
    focus = frozenset(reference_targets(observation.focus))
    when, last = observation_date(observation), observation_date_last(observation)
    return TumorSize(ref_of(observation), when, size * factor, focus, last if last != when else None)


def read_tumors(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    """mCODE Tumor BodyStructures: one per lesion; their location or related Condition gives the organ."""
    met_organs = {m.source: m.organ for m in facts.metastases if m.source}
    for raw in chart.of_type("BodyStructure"):
        if raw.get("active") is False or not chart.claim(raw):
            continue
        structure = validated(BodyStructure, raw, facts)
        if structure is None:
            # A Tumor record that cannot be read is still a lesion where its location says: counted,
            # with no size, so it can only raise the lesion count or leave the largest size unknown.
            source = ref_of(raw)
            organ = term.organ_of_body_site(raw_codings(raw.get("location")))
            if source and organ:
                facts.tumors.append(Tumor(source, organ, frozenset()))
            continue
        if not structure.id:
            continue
        related = frozenset(
            target
            for ext in structure.extension or []
            if ext.url in _RELATED_CONDITION_URLS and ext.valueReference is not None
            for target in reference_targets([ext.valueReference])
        )
        organ = term.organ_of_body_site(codings(structure.location))
        if organ is None:
            organ = next((met_organs[r] for r in sorted(related) if met_organs.get(r)), None)
        facts.tumors.append(Tumor(f"BodyStructure/{structure.id}", organ, related))
    facts.tumors.sort(key=lambda t: t.source)

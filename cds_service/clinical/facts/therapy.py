"""MedicationRequest / Administration / Statement → colorectal systemic therapy."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fhir.resources.R4B.medicationadministration import MedicationAdministration
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.medicationstatement import MedicationStatement

from cds_service.clinical.chart import Chart
from cds_service.clinical.facts.model import PatientFacts, SystemicTherapy
from cds_service.clinical.facts.rawjson import json_list, json_str
from cds_service.clinical.facts.validation import validated
from cds_service.clinical.fhir_fields import as_date, last_day, raw_codings, ref_of
from cds_service.clinical.knowledge.terminology import Terminology

_MEDICATION_MODELS = {
    "MedicationRequest": MedicationRequest,
    "MedicationAdministration": MedicationAdministration,
    "MedicationStatement": MedicationStatement,
}


def _medications_by_reference(chart: Chart) -> dict[str, dict[str, Any]]:
    return {f"Medication/{m['id']}": m for m in chart.of_type("Medication") if isinstance(m.get("id"), str)}


def _drug(
    raw: dict[str, Any], medications: dict[str, dict[str, Any]], term: Terminology
) -> tuple[str, str] | None:
    """(drug, how it matched) for a raw medication resource, or None."""
    concept = raw.get("medicationCodeableConcept")
    ref = raw.get("medicationReference")
    medication = None
    if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
        target = ref["reference"]
        if target.startswith("#"):
            medication = next(
                (
                    c
                    for c in json_list(raw.get("contained"))
                    if isinstance(c, dict) and c.get("id") == target[1:]
                ),
                None,
            )
        else:
            medication = medications.get("/".join(target.split("/_history/")[0].split("/")[-2:]))
        if medication is not None:
            concept = medication.get("code")
    drug = term.drug_of_codings(raw_codings(concept))
    if drug:
        return drug, "RxNorm code"
    if medication is not None:
        for ingredient in json_list(medication.get("ingredient")):
            if isinstance(ingredient, dict):
                drug = term.drug_of_codings(raw_codings(ingredient.get("itemCodeableConcept")))
                if drug:
                    return drug, "Medication ingredient"
    texts = []
    if isinstance(concept, dict):
        texts.append(concept.get("text") or "")
        texts.extend(c.get("display") or "" for c in json_list(concept.get("coding")) if isinstance(c, dict))
    if isinstance(ref, dict):
        texts.append(ref.get("display") or "")
    for text in texts:
        drug = term.drug_of_text(text if isinstance(text, str) else "")
        if drug:
            return drug, "drug name"
    return None


def _therapy_start(resource: Any) -> tuple[dt.date | None, dt.date | None]:
    """The earliest date in the chart, as the first and the last day it may be (a partial date is
    a range: `2021` beside 2021-03-05 puts the start between 2021-01-01 and 2021-03-05)."""
    dates: list[Any] = []
    rtype = resource.get_resource_type()
    if rtype == "MedicationRequest":
        dates.append(resource.authoredOn)
        for dosage in resource.dosageInstruction or []:
            timing = dosage.timing
            if timing is not None:
                dates.extend(timing.event or [])
                repeat = timing.repeat
                if repeat is not None and repeat.boundsPeriod is not None:
                    dates.append(repeat.boundsPeriod.start)
    else:
        dates.append(resource.effectiveDateTime)
        if resource.effectivePeriod is not None:
            dates.append(resource.effectivePeriod.start)
    found = [(as_date(v), last_day(v)) for v in dates]
    known = [(first, last or first) for first, last in found if first is not None]
    if not known:
        return None, None
    return min(first for first, _ in known), min(last for _, last in known)


def read_systemic_therapy(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    medications = _medications_by_reference(chart)
    for rtype, model in _MEDICATION_MODELS.items():
        ignored = term.medication_statuses_ignored[rtype]
        for raw in chart.of_type(rtype):
            if json_str(raw.get("status")) in ignored:
                continue
            hit = _drug(raw, medications, term)
            if hit is None or not chart.claim(raw):
                continue
            resource = validated(model, raw, facts)
            if resource is None:
                # A drug order that cannot be read is still therapy of unknown start: the CEA rule
                # then treats it as undated (§8.4), never as no therapy at all.
                facts.systemic.append(
                    SystemicTherapy(ref_of(raw), hit[0], None, f"{hit[1]} (not valid FHIR R4)")
                )
                continue
            start, start_last = _therapy_start(resource)
            facts.systemic.append(
                SystemicTherapy(
                    ref_of(resource), hit[0], start, hit[1], start_last if start_last != start else None
                )
            )
    facts.systemic.sort(key=lambda t: (t.start or dt.date.max, t.source or ""))

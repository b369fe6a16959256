"""Procedure and ServiceRequest → primary resections, local excisions, local therapy of the
metastases (done or planned), and chemotherapy charted as a procedure."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fhir.resources.R4B.procedure import Procedure
from fhir.resources.R4B.servicerequest import ServiceRequest

from cds_service.clinical.chart import Chart
from cds_service.clinical.facts.dates import procedure_date, procedure_date_last
from cds_service.clinical.facts.model import DatedProcedure, PatientFacts, SystemicTherapy
from cds_service.clinical.facts.rawjson import json_str
from cds_service.clinical.facts.validation import validated
from cds_service.clinical.fhir_fields import (
    as_date,
    codings,
    codings_of_list,
    display_of,
    raw_codings,
    ref_of,
    reference_targets,
)
from cds_service.clinical.knowledge.terminology import Terminology

_EXCLUDED_PROCEDURE = {"entered-in-error", "not-done"}
_PLANNED_PROCEDURE = {"preparation", "in-progress", "on-hold"}


def read_procedures(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    lung_sources = {m.source for m in facts.sites("lung") if m.source}
    for raw in chart.of_type("Procedure"):
        tags = term.procedure_tags(raw_codings(raw.get("code")))
        if not tags:
            continue
        resection, excision, systemic = "resection" in tags, "excision" in tags, "systemic" in tags
        kinds = term.local_therapy_by_tag
        therapy = [kinds[t] for t in tags if t in kinds]
        if not chart.claim(raw):
            continue
        procedure = validated(Procedure, raw, facts)
        if procedure is None or procedure.status in _EXCLUDED_PROCEDURE:
            continue
        source, when = ref_of(procedure), procedure_date(procedure)
        label = display_of(procedure.code) or "procedure"
        done = procedure.status == "completed"
        if systemic:
            # Chemotherapy charted as given (docs/terminology.md §7): dates systemic therapy like an
            # administration does (§8.4). In preparation, it has not been given yet.
            if procedure.status != "preparation":
                drug = _chemotherapy_label(procedure.code)
                last = procedure_date_last(procedure)
                facts.systemic.append(
                    SystemicTherapy(
                        source, drug, when, "chemotherapy procedure code", last if last != when else None
                    )
                )
            continue
        if resection or excision:
            if done:  # only a completed resection dates the DFI
                target = facts.resections if resection else facts.local_excisions
                last = procedure_date_last(procedure)
                target.append(DatedProcedure(source, when, label, date_last=last if last != when else None))
            continue
        for organ, kind in therapy:
            if kind.requires_lung_site and not _aimed_at_lung(procedure, term, lung_sources):
                continue  # radiotherapy with no sign that it treated the lung
            if done or procedure.status in _PLANNED_PROCEDURE:
                facts.local_therapies.append(
                    DatedProcedure(source, when, kind.display, kind.kind, organ, done)
                )
            break
    facts.resections.sort(key=lambda p: (p.date or dt.date.max, p.source or ""))
    facts.local_excisions.sort(key=lambda p: (p.date or dt.date.max, p.source or ""))
    facts.local_therapies.sort(key=lambda p: (p.date or dt.date.max, p.source or ""))


def _aimed_at_lung(resource: Procedure | ServiceRequest, term: Terminology, lung_sources: set[str]) -> bool:
    """A radiotherapy code names no site: its body site, or the reason it was given, must be the lung."""
    body_site = codings_of_list(resource.bodySite)
    if term.organ_of_body_site(body_site) == "lung" or term.site_of(body_site) is term.sites["lung"]:
        return True
    if lung_sources & set(reference_targets(resource.reasonReference)):
        return True
    reason = term.condition_concept(codings_of_list(resource.reasonCode))
    return reason is not None and reason.site is term.sites["lung"]


def _chemotherapy_label(code: Any) -> str:
    display = code.text or next((c.display for c in code.coding or [] if c.display), None) if code else None
    if display:
        return display
    coded = codings(code)
    return f"chemotherapy ({coded[0][1]})" if coded else "chemotherapy"


def read_planned_local_therapy(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    """ServiceRequests for lung (or liver) ablation / SBRT not yet done: treatment planned."""
    lung_sources = {m.source for m in facts.sites("lung") if m.source}
    kinds = term.local_therapy_by_tag
    for raw in chart.of_type("ServiceRequest"):
        if json_str(raw.get("status")) not in term.planned_request_statuses:
            continue
        tags = [t for t in term.procedure_tags(raw_codings(raw.get("code"))) if t in kinds]
        if not tags or not chart.claim(raw):
            continue
        request = validated(ServiceRequest, raw, facts)
        if request is None:
            continue
        for tag in tags:
            organ, kind = kinds[tag]
            if kind.requires_lung_site and not _aimed_at_lung(request, term, lung_sources):
                continue
            when = as_date(request.occurrenceDateTime) or as_date(request.authoredOn)
            facts.local_therapies.append(
                DatedProcedure(ref_of(request), when, kind.display, kind.kind, organ, done=False)
            )
            break

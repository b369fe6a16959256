"""FHIR chart → typed facts with provenance (docs/clinical-rules.md §2).

Pure: a Chart in, PatientFacts out, no I/O. Resources are picked by their codings first (cheap, on
the raw JSON) and only those are validated with fhir.resources R4B models, on the elements the facts
read (facts/read_elements.py); a picked resource whose read elements are not valid FHIR is skipped
and named, never guessed at.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cds_service.clinical.chart import Chart
from cds_service.clinical.facts.conditions import read_condition_stages, read_conditions
from cds_service.clinical.facts.model import PatientFacts
from cds_service.clinical.facts.observations import read_observations, validate_used_cea
from cds_service.clinical.facts.procedures import read_planned_local_therapy, read_procedures
from cds_service.clinical.facts.therapy import read_systemic_therapy
from cds_service.clinical.facts.tumors import read_tumors
from cds_service.clinical.fhir_fields import as_date, last_day
from cds_service.clinical.knowledge.terminology import Terminology, terminology


def _deceased(patient: dict[str, Any] | None) -> bool:
    if not patient:
        return False
    # A deceasedDateTime counts only as a date: "unknown" or a stray object is not a death.
    return patient.get("deceasedBoolean") is True or as_date(patient.get("deceasedDateTime")) is not None


def derive_facts(chart: Chart, term: Terminology | None = None) -> PatientFacts:
    term = term or terminology()
    facts = PatientFacts(patient_id=chart.patient_id, deceased=_deceased(chart.patient))
    facts.unread = chart.unread
    born = (chart.patient or {}).get("birthDate")
    facts.birth_date, facts.birth_date_last = as_date(born), last_day(born)
    staged = read_conditions(chart, term, facts)
    if not facts.in_scope:
        return facts  # quiet and fast: nothing more to read
    read_procedures(chart, term, facts)
    read_planned_local_therapy(chart, term, facts)
    facts.local_therapies.sort(key=lambda p: (p.date or dt.date.max, p.source or ""))
    read_systemic_therapy(chart, term, facts)
    read_observations(chart, term, facts)
    cutoffs: set[dt.date | None] = {None, *(facts.treatment_cutoff(o)[0] for o in ("lung", "liver"))}
    validate_used_cea(facts, cutoffs)
    read_condition_stages(staged, term, facts)
    read_tumors(chart, term, facts)
    facts.tumor_sizes.sort(key=lambda s: (s.date or dt.date.min, s.source or ""))
    facts.nodal.sort(key=lambda n: (n.date or dt.date.min, n.source or ""))
    return facts

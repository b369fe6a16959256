"""TNM N categories and stage groups of the colorectal primary (not of another cancer)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from fhir.resources.R4B.observation import Observation

from cds_service.clinical.chart import Chart
from cds_service.clinical.facts.dates import observation_date
from cds_service.clinical.facts.model import NodalEvidence, PatientFacts
from cds_service.clinical.fhir_fields import codings, display_of, raw_codings, ref_of, reference_targets
from cds_service.clinical.knowledge.terminology import Terminology

_AJCC_N = re.compile(r"^(?P<prefix>yp|yc|p|c)?N(?P<n>X|[0-3])", re.IGNORECASE)
_AJCC_STAGE = re.compile(r"^(?P<prefix>yp|yc|p|c)?(?:stage\s*)?(?P<g>IV|III|II|I|[1-4])(?:[A-C]\d?)?$", re.I)
_ARABIC = {"1": "I", "2": "II", "3": "III", "4": "IV"}
_PREFIX_KIND = {"p": "pathologic", "yp": "pathologic", "c": "clinical", "yc": "clinical"}


def _n_value(observation: Observation, term: Terminology) -> tuple[str | None, str | None, str]:
    """(kind from the value, N value, the category as charted) of a TNM N category Observation."""
    concept = observation.valueCodeableConcept
    for coding in codings(concept):
        hit = term.n_values.get(coding)
        if hit:
            kind, value, label = hit
            return kind, value, label  # a coded value: its AJCC label, "pN2b"
    for system, code in [*codings(concept), ("", concept.text or "")] if concept else []:
        if system and system not in term.ajcc_systems:
            continue
        match = _AJCC_N.match(code.strip())
        if match:
            prefix = (match.group("prefix") or "").lower()
            return _PREFIX_KIND.get(prefix), match.group("n").upper(), code.strip()
    return None, None, display_of(concept) or "unreadable"


def stage_value(concept: Any, term: Terminology) -> tuple[str | None, str | None, str]:
    """(kind from the value, Roman group, the stage as charted: "stage IIIB (AJCC)")."""
    for coding in codings(concept):
        hit = term.stage_values.get(coding)
        if hit:
            group, label = hit
            return None, group, label
    for system, code in [*codings(concept), ("", concept.text or "")] if concept else []:
        if system and system not in term.ajcc_systems:
            continue
        match = _AJCC_STAGE.match(code.strip())
        if match:
            prefix = (match.group("prefix") or "").lower()
            group = match.group("g").upper()
            shown = code.strip()
            return (
                _PREFIX_KIND.get(prefix),
                _ARABIC.get(group, group),
                shown if shown.lower().startswith("stage") else f"stage {shown}",
            )
    return None, None, ""


def kind_of(found: list, sets: dict) -> str | None:
    for kind in ("pathologic", "clinical", "unspecified"):
        if sets[kind].any(found):
            return kind
    return None


class OtherDiseases:
    """Which `Condition/<id>` references name a Condition of the chart coded as something other than
    the colorectal primary. Indexed on first use: most staging names no focus at all."""

    def __init__(self, chart: Chart, term: Terminology) -> None:
        self._chart, self._term = chart, term
        self._by_ref: dict[str, dict[str, Any]] | None = None

    def any_of(self, refs: set[str]) -> bool:
        if not refs:
            return False
        if self._by_ref is None:
            self._by_ref = {ref: c for c in self._chart.of_type("Condition") if (ref := ref_of(c))}
        for ref in refs:
            condition = self._by_ref.get(ref)
            if condition is not None:
                found = raw_codings(condition.get("code"))
                concept = self._term.condition_concept(found)
                if found and (concept is None or concept.kind != "primary"):
                    return True
        return False


# Staging dated this long before the colorectal cancer was diagnosed cannot be its staging.
_STAGING_BEFORE_DIAGNOSIS = dt.timedelta(days=90)


def read_staging(
    staging: list[tuple[Observation, str, str]], term: Terminology, facts: PatientFacts, other: OtherDiseases
) -> None:
    """N categories and stage groups of the colorectal primary, not of another cancer in the chart.

    An mCODE TNM category names no `focus` of its own: it is a `hasMember` of the stage group
    Observation whose `focus` is the cancer staged, so it takes that focus. One that is tied to no
    cancer either way and dated well before the colorectal cancer's onset stages an earlier cancer.
    """
    parents: dict[str, list[str]] = {}
    for observation, _, _ in staging:
        for member in reference_targets(observation.hasMember):
            parents.setdefault(member, []).extend(reference_targets(observation.focus))
    # From the onset only: a recordedDate may postdate the diagnosis (and its staging) by years.
    onset = facts.primary_onset
    earliest = (
        onset - _STAGING_BEFORE_DIAGNOSIS
        if onset and onset > dt.date.min + _STAGING_BEFORE_DIAGNOSIS
        else None
    )
    for observation, what, kind in staging:
        source, when = ref_of(observation), observation_date(observation)
        focus = set(reference_targets(observation.focus)) or set(parents.get(source or "", ()))
        if other.any_of(focus):
            continue  # staging of another cancer
        if not focus and earliest and when and when < earliest:
            continue
        if what == "n":
            value_kind, value, shown = _n_value(observation, term)
            if value is not None:
                facts.nodal.append(NodalEvidence(source, when, value_kind or kind, "N", value, shown))
        else:
            value_kind, group, shown = stage_value(observation.valueCodeableConcept, term)
            if group is not None:
                facts.nodal.append(NodalEvidence(source, when, value_kind or kind, "stage", group, shown))

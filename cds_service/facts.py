"""FHIR chart → typed facts with provenance (clinical-logic §2).

Pure: a Chart in, PatientFacts out, no I/O. Resources are picked by their codings first (cheap, on
the raw JSON) and only those are validated with fhir.resources R4B models; a picked resource that
is not valid FHIR is skipped and named, never guessed at.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.procedure import Procedure
from pydantic import ValidationError

from .chart import Chart
from .fhirutil import as_date, codings, codings_of_list, display_of, raw_codings, ref_of, reference_targets
from .terminology import Terminology, terminology

log = logging.getLogger(__name__)

_EXCLUDED_VERIFICATION = {"entered-in-error", "refuted"}
_EXCLUDED_PROCEDURE = {"entered-in-error", "not-done"}
_PLANNED_PROCEDURE = {"preparation", "in-progress", "on-hold"}


@dataclass(frozen=True)
class Metastasis:
    source: str | None
    organ: str | None  # None: the Condition codes no site we can read
    display: str
    region: str  # lung | thoracic | extrapulmonary | unknown
    detected: dt.date | None
    kind: str = "site"  # site | lymphangitic | pleural-effusion


@dataclass(frozen=True)
class DatedProcedure:
    source: str | None
    date: dt.date | None
    display: str
    kind: str = ""
    organ: str = ""
    done: bool = True


@dataclass(frozen=True)
class CeaResult:
    source: str | None
    date: dt.date | None
    ng_ml: float | None  # None when the result cannot be read
    comparator: str | None
    shown: str  # as reported, for the card
    unreadable: str | None = None  # why it cannot be used


@dataclass(frozen=True)
class NodalEvidence:
    source: str | None
    date: dt.date | None
    kind: str  # pathologic | clinical | unspecified
    what: str  # "N" (category) or "stage"
    value: str  # N: "0", "1", "2", "3", "X"; stage: "I".."IV"
    shown: str


@dataclass
class PatientFacts:
    patient_id: str
    deceased: bool = False
    primaries: list[str] = field(default_factory=list)
    primary_diagnosis: dt.date | None = None
    metastases: list[Metastasis] = field(default_factory=list)
    resections: list[DatedProcedure] = field(default_factory=list)
    local_excisions: list[DatedProcedure] = field(default_factory=list)
    local_therapies: list[DatedProcedure] = field(default_factory=list)
    cea: list[CeaResult] = field(default_factory=list)
    nodal: list[NodalEvidence] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # picked resources that were not valid FHIR

    @property
    def has_crc(self) -> bool:
        return bool(self.primaries)

    def sites(self, organ: str) -> list[Metastasis]:
        # Lymphangitic carcinomatosis counts as lung disease (facts of its own kind, same organ).
        return [m for m in self.metastases if m.organ == organ]

    @property
    def in_scope(self) -> bool:
        return self.has_crc and not self.deceased and bool(self.sites("lung") or self.sites("liver"))

    def detected(self, organ: str) -> tuple[dt.date | None, list[str]]:
        """Earliest detection date of an organ's metastases, and the Conditions it comes from."""
        mets = self.sites(organ)
        dated = sorted((m.detected, m.source or "") for m in mets if m.detected)
        if not dated:
            return None, [m.source for m in mets if m.source]
        first = dated[0][0]
        return first, [src for d, src in dated if d == first and src]

    def therapies(self, organ: str, *, done: bool) -> list[DatedProcedure]:
        return [t for t in self.local_therapies if t.organ == organ and t.done is done]


# --- validation --------------------------------------------------------------------------------


def _validated(model: Any, resource: dict[str, Any], facts: PatientFacts) -> Any | None:
    try:
        return model.model_validate(resource)
    except ValidationError as exc:
        where = ref_of(resource) or resource.get("resourceType", "resource")
        # Field paths only: the offending values may be PHI.
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})[:3]
        log.warning("skipped %s: not valid FHIR R4 (%s)", where, ", ".join(fields))
        facts.skipped.append(where)
        return None


def _verification(condition: Condition) -> set[str]:
    return {code for _, code in codings(condition.verificationStatus)}


def _condition_date(condition: Condition) -> dt.date | None:
    onset = condition.onsetDateTime or (condition.onsetPeriod.start if condition.onsetPeriod else None)
    return as_date(onset) or as_date(condition.recordedDate)


def _procedure_date(procedure: Procedure) -> dt.date | None:
    performed = procedure.performedDateTime or (
        procedure.performedPeriod.start if procedure.performedPeriod else None
    )
    return as_date(performed)


def _observation_date(observation: Observation) -> dt.date | None:
    effective = observation.effectiveDateTime or (
        observation.effectivePeriod.start if observation.effectivePeriod else None
    )
    return as_date(effective) or as_date(observation.effectiveInstant) or as_date(observation.issued)


# --- conditions --------------------------------------------------------------------------------


def _read_conditions(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    primary_dates: list[dt.date] = []
    for raw in chart.of_type("Condition"):
        found = raw_codings(raw.get("code"))
        is_primary = term.primary_crc.any(found)
        site = term.site_of(found)
        unspecified = term.site_unspecified.any(found)
        lymphangitic = term.lymphangitic.any(found)
        effusion = term.malignant_pleural_effusion.any(found)
        if not (is_primary or site or unspecified or lymphangitic or effusion):
            continue
        condition = _validated(Condition, raw, facts)
        if condition is None or _verification(condition) & _EXCLUDED_VERIFICATION:
            continue
        source = ref_of(condition)
        when = _condition_date(condition)
        if is_primary:
            if source:
                facts.primaries.append(source)
            if when:
                primary_dates.append(when)
            continue
        body_organ = term.organ_of_body_site(codings_of_list(condition.bodySite))
        if site is None and body_organ:
            site = term.sites[body_organ]
        if lymphangitic:
            # Counted as pulmonary unless the body site names another organ (spec choice).
            if body_organ in (None, "lung"):
                facts.metastases.append(
                    Metastasis(source, "lung", "lymphangitic carcinomatosis", "lung", when, "lymphangitic")
                )
            continue
        if effusion:
            facts.metastases.append(
                Metastasis(
                    source, "pleura", "malignant pleural effusion", "thoracic", when, "pleural-effusion"
                )
            )
            continue
        if site is None:
            facts.metastases.append(Metastasis(source, None, "site not coded", "unknown", when))
        else:
            facts.metastases.append(Metastasis(source, site.organ, site.display, site.region, when))
    facts.primary_diagnosis = min(primary_dates, default=None)
    facts.primaries.sort()
    facts.metastases.sort(key=lambda m: (m.organ or "~", m.detected or dt.date.max, m.source or ""))


# --- procedures --------------------------------------------------------------------------------


def _read_procedures(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    lung_sources = {m.source for m in facts.sites("lung") if m.source}
    for raw in chart.of_type("Procedure"):
        found = raw_codings(raw.get("code"))
        resection = term.primary_resection.any(found)
        excision = term.local_excision.any(found)
        therapy = [("lung", k) for k in term.lung_local_therapy if k.codes.any(found)] + [
            ("liver", k) for k in term.liver_local_therapy if k.codes.any(found)
        ]
        if not (resection or excision or therapy):
            continue
        procedure = _validated(Procedure, raw, facts)
        if procedure is None or procedure.status in _EXCLUDED_PROCEDURE:
            continue
        source, when = ref_of(procedure), _procedure_date(procedure)
        label = display_of(procedure.code) or "procedure"
        done = procedure.status == "completed"
        if resection or excision:
            if done:  # only a completed resection dates the DFI
                target = facts.resections if resection else facts.local_excisions
                target.append(DatedProcedure(source, when, label))
            continue
        for organ, kind in therapy:
            if kind.requires_lung_site and not (
                term.lung_body_sites.any(codings_of_list(procedure.bodySite))
                or term.site_of(codings_of_list(procedure.bodySite)) is term.sites["lung"]
                or lung_sources & set(reference_targets(procedure.reasonReference))
            ):
                continue  # radiotherapy with no sign that it treated the lung
            if done or procedure.status in _PLANNED_PROCEDURE:
                facts.local_therapies.append(
                    DatedProcedure(source, when, kind.display, kind.kind, organ, done)
                )
            break
    facts.resections.sort(key=lambda p: (p.date or dt.date.max, p.source or ""))
    facts.local_excisions.sort(key=lambda p: (p.date or dt.date.max, p.source or ""))
    facts.local_therapies.sort(key=lambda p: (p.date or dt.date.max, p.source or ""))


# --- observations ------------------------------------------------------------------------------

_AJCC_N = re.compile(r"^(?P<prefix>yp|yc|p|c)?N(?P<n>X|[0-3])", re.IGNORECASE)
_AJCC_STAGE = re.compile(r"^(?P<prefix>yp|yc|p|c)?(?:stage\s*)?(?P<g>IV|III|II|I|[1-4])(?:[A-C]\d?)?$", re.I)
_ARABIC = {"1": "I", "2": "II", "3": "III", "4": "IV"}
_PREFIX_KIND = {"p": "pathologic", "yp": "pathologic", "c": "clinical", "yc": "clinical"}


def _fmt(number: float) -> str:
    return f"{number:.6g}"


def _cea(observation: Observation, term: Terminology, unconvertible: bool) -> CeaResult:
    source, when = ref_of(observation), _observation_date(observation)
    quantity = observation.valueQuantity
    if quantity is None or quantity.value is None:
        shown = observation.valueString or display_of(observation.valueCodeableConcept) or "no value"
        return CeaResult(source, when, None, None, shown, "not a numeric result")
    comparator = quantity.comparator
    unit = (quantity.code if quantity.system in term.ucum_systems else None) or quantity.unit or quantity.code
    shown = f"{comparator or ''}{_fmt(float(quantity.value))} {unit or '(no unit)'}"
    if unconvertible:
        return CeaResult(
            source,
            when,
            None,
            comparator,
            shown,
            f"reported in {unit or 'molar or arbitrary units'}: converting it to ng/mL "
            "needs a molar mass or assay calibrator",
        )
    canonical = term.cea_unit_aliases.get(unit or "", unit or "")
    factor = term.cea_units.get(canonical)
    if factor is None:
        why = f"unit {unit!r} cannot be converted to ng/mL" if unit else "no unit given"
        return CeaResult(source, when, None, comparator, shown, why)
    if when is None:
        return CeaResult(source, None, None, comparator, shown, "no date")
    return CeaResult(source, when, float(quantity.value) * factor, comparator, shown)


def _n_value(observation: Observation, term: Terminology) -> tuple[str | None, str | None, str]:
    """(kind from the value, N value, shown) of a TNM N category Observation."""
    concept = observation.valueCodeableConcept
    for coding in codings(concept):
        hit = term.n_values.get(coding)
        if hit:
            kind, value = hit
            return kind, value, ""  # a coded value: "pN1" says it all
    for system, code in [*codings(concept), ("", concept.text or "")] if concept else []:
        if system and system not in term.ajcc_systems:
            continue
        match = _AJCC_N.match(code.strip())
        if match:
            prefix = (match.group("prefix") or "").lower()
            return _PREFIX_KIND.get(prefix), match.group("n").upper(), code.strip()
    return None, None, display_of(concept) or "unreadable"


def _stage_value(concept: Any, term: Terminology) -> tuple[str | None, str | None, str]:
    for coding in codings(concept):
        group = term.stage_values.get(coding)
        if group:
            return None, group, display_of(concept) or f"stage {group}"
    for system, code in [*codings(concept), ("", concept.text or "")] if concept else []:
        if system and system not in term.ajcc_systems:
            continue
        match = _AJCC_STAGE.match(code.strip())
        if match:
            prefix = (match.group("prefix") or "").lower()
            group = match.group("g").upper()
            return _PREFIX_KIND.get(prefix), _ARABIC.get(group, group), code.strip()
    return None, None, ""


def _kind_of(found: list, sets: dict) -> str | None:
    for kind in ("pathologic", "clinical", "unspecified"):
        if sets[kind].any(found):
            return kind
    return None


def _read_observations(chart: Chart, term: Terminology, facts: PatientFacts, non_crc: set[str]) -> None:
    for raw in chart.of_type("Observation"):
        found = raw_codings(raw.get("code"))
        mass, unconvertible = term.cea_mass.any(found), term.cea_unconvertible.any(found)
        n_kind = _kind_of(found, term.n_category)
        stage_kind = _kind_of(found, term.stage_group)
        if not (mass or unconvertible or n_kind or stage_kind):
            continue
        observation = _validated(Observation, raw, facts)
        if observation is None:
            continue
        if mass or unconvertible:
            if observation.status in term.cea_statuses:
                facts.cea.append(_cea(observation, term, unconvertible and not mass))
            continue
        if observation.status not in term.tnm_statuses:
            continue
        if non_crc & set(reference_targets(observation.focus)):
            continue  # staging of another cancer
        source, when = ref_of(observation), _observation_date(observation)
        if n_kind:
            value_kind, value, shown = _n_value(observation, term)
            if value is not None:
                kind = value_kind or n_kind
                facts.nodal.append(NodalEvidence(source, when, kind, "N", value, shown))
        else:
            value_kind, group, shown = _stage_value(observation.valueCodeableConcept, term)
            if group is not None:
                facts.nodal.append(
                    NodalEvidence(source, when, value_kind or stage_kind, "stage", group, shown)
                )
    facts.cea.sort(key=lambda c: (c.date or dt.date.min, c.source or ""))


def _read_condition_stages(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    """Condition.stage.summary of the colorectal primary (plain US Core data)."""
    primaries = set(facts.primaries)
    for raw in chart.of_type("Condition"):
        if ref_of(raw) not in primaries or not raw.get("stage"):
            continue
        condition = Condition.model_validate(raw)  # already validated once when picked
        for stage in condition.stage or []:
            value_kind, group, shown = _stage_value(stage.summary, term)
            if group is None:
                continue
            type_kind = _kind_of(codings(stage.type), term.stage_group)
            kind = value_kind or type_kind or "unspecified"
            facts.nodal.append(
                NodalEvidence(ref_of(condition), _condition_date(condition), kind, "stage", group, shown)
            )


def _non_crc_conditions(chart: Chart, term: Terminology) -> set[str]:
    """Conditions that are some other cancer or disease: staging focused on them is not ours."""
    out = set()
    for raw in chart.of_type("Condition"):
        found = raw_codings(raw.get("code"))
        if found and not term.primary_crc.any(found):
            ref = ref_of(raw)
            if ref:
                out.add(ref)
    return out


def _deceased(patient: dict[str, Any] | None) -> bool:
    if not patient:
        return False
    return patient.get("deceasedBoolean") is True or bool(patient.get("deceasedDateTime"))


def derive_facts(chart: Chart, term: Terminology | None = None) -> PatientFacts:
    term = term or terminology()
    facts = PatientFacts(patient_id=chart.patient_id, deceased=_deceased(chart.patient))
    _read_conditions(chart, term, facts)
    if not facts.in_scope:
        return facts  # quiet and fast: nothing more to read
    _read_procedures(chart, term, facts)
    _read_observations(chart, term, facts, _non_crc_conditions(chart, term))
    _read_condition_stages(chart, term, facts)
    facts.nodal.sort(key=lambda n: (n.date or dt.date.min, n.source or ""))
    return facts

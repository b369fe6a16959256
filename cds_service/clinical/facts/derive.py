"""FHIR chart → typed facts with provenance (clinical-logic §2).

Pure: a Chart in, PatientFacts out, no I/O. Resources are picked by their codings first (cheap, on
the raw JSON) and only those are validated with fhir.resources R4B models; a picked resource that
is not valid FHIR is skipped and named, never guessed at.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from fhir.resources.R4B.bodystructure import BodyStructure
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.medicationadministration import MedicationAdministration
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.medicationstatement import MedicationStatement
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.procedure import Procedure
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from cds_service.clinical.chart import Chart
from cds_service.clinical.fhir_fields import (
    as_date,
    codings,
    codings_of_list,
    display_of,
    raw_codings,
    ref_of,
    reference_targets,
)
from cds_service.clinical.knowledge.terminology import Coding, Terminology, terminology

log = logging.getLogger("cds_service.facts")  # the name operators filter on, kept across the move

_EXCLUDED_VERIFICATION = {"entered-in-error", "refuted"}
# mCODE Tumor.relatedCondition uses the core extension (terminology.md marks the URL unverified).
_RELATED_CONDITION_URLS = {
    "http://hl7.org/fhir/StructureDefinition/condition-related",
    "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-related-condition",
}
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
    body_sites: frozenset[Coding] = frozenset()  # Condition.bodySite codings (distinct lesions, §8.16)


@dataclass(frozen=True)
class DatedProcedure:
    source: str | None
    date: dt.date | None
    display: str
    kind: str = ""
    organ: str = ""
    done: bool = True


# Not frozen, unlike the other facts: one is built per CEA result of the chart (hundreds in a long
# follow-up), and a frozen dataclass's __init__ costs four times as much. Treat it as immutable all
# the same (dataclasses.replace).
@dataclass(slots=True)
class CeaResult:
    source: str | None
    date: dt.date | None
    ng_ml: float | None  # None when the result cannot be read
    comparator: str | None
    shown: str  # as reported, for the card
    unreadable: str | None = None  # why it cannot be used
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class NodalEvidence:
    source: str | None
    date: dt.date | None
    kind: str  # pathologic | clinical | unspecified
    what: str  # "N" (category) or "stage"
    value: str  # N: "0", "1", "2", "3", "X"; stage: "I".."IV"
    shown: str


@dataclass(frozen=True)
class Tumor:
    """A Tumor BodyStructure (mCODE) and the metastasis Conditions it is related to."""

    source: str
    organ: str | None
    related: frozenset[str]


@dataclass(frozen=True)
class TumorSize:
    source: str | None
    date: dt.date | None
    longest_cm: float
    focus: frozenset[str]  # BodyStructure / Condition references


@dataclass(frozen=True)
class SystemicTherapy:
    """One order / administration / statement of a colorectal systemic-therapy drug, or one
    chemotherapy procedure."""

    source: str | None
    drug: str
    start: dt.date | None  # its earliest date in the chart (clinical-logic §8.4)
    matched_by: str  # "RxNorm code" | "Medication ingredient" | "drug name" | "chemotherapy procedure code"


@dataclass
class PatientFacts:
    patient_id: str
    deceased: bool = False
    primaries: list[str] = field(default_factory=list)
    primary_diagnosis: dt.date | None = None
    # The earliest onset of the primary (not its recordedDate, which may come long after).
    primary_onset: dt.date | None = None
    metastases: list[Metastasis] = field(default_factory=list)
    resections: list[DatedProcedure] = field(default_factory=list)
    local_excisions: list[DatedProcedure] = field(default_factory=list)
    local_therapies: list[DatedProcedure] = field(default_factory=list)
    cea: list[CeaResult] = field(default_factory=list)  # by date, then value, then source
    nodal: list[NodalEvidence] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # picked resources that were not valid FHIR
    tumors: list[Tumor] = field(default_factory=list)
    tumor_sizes: list[TumorSize] = field(default_factory=list)
    systemic: list[SystemicTherapy] = field(default_factory=list)

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

    def systemic_since(self, organ: str) -> list[SystemicTherapy]:
        """Systemic therapy started on or after the organ's metastases were found (therapy for them)."""
        detected, _ = self.detected(organ)
        if detected is None:
            return []
        return [t for t in self.systemic if t.start is not None and t.start >= detected]

    def treatment_cutoff(self, organ: str) -> tuple[dt.date | None, str]:
        """When treatment of the organ's metastases began, and what began (clinical-logic §8.4, §8.19):
        the first local therapy done, or the start of systemic therapy for the metastases.

        A therapy with no date may have begun any day since the metastases were found, so then
        their detection is the cutoff: only a CEA from before it is surely not on treatment
        (dt.date.min when the detection is undated too: no CEA can be placed before treatment).
        """
        candidates = [(t.date, f"first {t.display}") for t in self.therapies(organ, done=True) if t.date]
        candidates += [(t.start, "start of systemic therapy") for t in self.systemic_since(organ) if t.start]
        undated = [t.display for t in self.therapies(organ, done=True) if t.date is None]
        undated += ["systemic therapy" for t in self.systemic if t.start is None]
        if undated:
            detected, _ = self.detected(organ)
            candidates.append(
                (
                    detected or dt.date.min,
                    f"undated {undated[0]}, taken as no earlier than the {organ} metastases' detection",
                )
            )
        if not candidates:
            return None, ""
        return min(candidates)

    def therapies(self, organ: str, *, done: bool) -> list[DatedProcedure]:
        return [t for t in self.local_therapies if t.organ == organ and t.done is done]


# The display of a metastasis Condition that could not be read (not valid FHIR).
UNREADABLE = "not valid FHIR R4"


# --- validation --------------------------------------------------------------------------------


def _validated(model: Any, resource: dict[str, Any], facts: PatientFacts) -> Any | None:
    try:
        problems = _dates_not_strings(resource)
        if not problems:
            return model.model_validate(resource)
    except ValidationError as exc:
        # Field paths only: the offending values may be PHI.
        problems = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})[:3]
    except (KeyError, TypeError, ValueError) as exc:
        # fhir.resources itself trips over some shapes (a contained resource of no known type).
        problems = [type(exc).__name__]
    where = ref_of(resource) or _text(resource.get("resourceType")) or "resource"
    log.warning("skipped %s: not valid FHIR R4 (%s)", where, ", ".join(problems))
    facts.skipped.append(where)
    return None


# The date elements the facts are read from. FHIR JSON writes dates as strings; fhir.resources
# would take a number as seconds since 1970 (a date 20210101 would become 1970-08-22).
_DATE_ELEMENTS = (
    "onsetDateTime",
    "recordedDate",
    "abatementDateTime",
    "performedDateTime",
    "effectiveDateTime",
    "effectiveInstant",
    "issued",
    "authoredOn",
    "occurrenceDateTime",
)
_PERIOD_ELEMENTS = ("onsetPeriod", "performedPeriod", "effectivePeriod", "occurrencePeriod")


def _dates_not_strings(resource: dict[str, Any]) -> list[str]:
    bad = [k for k in _DATE_ELEMENTS if k in resource and type(resource[k]) is not str]
    for key in _PERIOD_ELEMENTS:
        period = resource.get(key)
        if type(period) is dict:
            bad += [f"{key}.{k}" for k in ("start", "end") if k in period and type(period[k]) is not str]
    return bad


def _verification(condition: Condition) -> set[str]:
    return {code for _, code in codings(condition.verificationStatus)}


def _condition_onset(condition: Condition) -> dt.date | None:
    return as_date(
        condition.onsetDateTime or (condition.onsetPeriod.start if condition.onsetPeriod else None)
    )


def _condition_date(condition: Condition) -> dt.date | None:
    return _condition_onset(condition) or as_date(condition.recordedDate)


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


def _read_conditions(chart: Chart, term: Terminology, facts: PatientFacts) -> list[Condition]:
    """Primaries and metastases; returns the primary's Conditions that carry a stage (validated)."""
    primary_dates: list[dt.date] = []
    onsets: list[dt.date] = []
    staged: list[Condition] = []
    for raw in chart.of_type("Condition"):
        concept = term.condition_concept(raw_codings(raw.get("code")))
        if concept is None:
            continue
        if not chart.claim(raw):
            continue
        condition = _validated(Condition, raw, facts)
        if condition is None:
            if concept.kind != "primary" and concept.site is not term.sites["lung"]:
                # Coded as a metastasis but not readable: it may be outside the lung, so the
                # extrapulmonary factor must not read "none" (it reads unknown, naming it).
                facts.metastases.append(Metastasis(ref_of(raw), None, UNREADABLE, "unknown", None))
            continue
        if _verification(condition) & _EXCLUDED_VERIFICATION:
            continue
        source = ref_of(condition)
        when = _condition_date(condition)
        if concept.kind == "primary":
            if source:
                facts.primaries.append(source)
                if raw.get("stage"):
                    staged.append(condition)
            if when:
                primary_dates.append(when)
            onset = _condition_onset(condition)
            if onset:
                onsets.append(onset)
            continue
        body_organ = term.organ_of_body_site(codings_of_list(condition.bodySite))
        site = concept.site
        if site is None and body_organ and concept.kind == "unspecified":
            site = term.sites[body_organ]
        if concept.kind == "lymphangitic":
            # Counted as pulmonary unless the body site names another organ (spec choice).
            if body_organ in (None, "lung"):
                facts.metastases.append(
                    Metastasis(source, "lung", "lymphangitic carcinomatosis", "lung", when, "lymphangitic")
                )
            continue
        if concept.kind == "effusion":
            facts.metastases.append(
                Metastasis(
                    source, "pleura", "malignant pleural effusion", "thoracic", when, "pleural-effusion"
                )
            )
            continue
        if site is None:
            facts.metastases.append(Metastasis(source, None, "site not coded", "unknown", when))
        else:
            facts.metastases.append(
                Metastasis(
                    source,
                    site.organ,
                    site.display,
                    site.region,
                    when,
                    "site",
                    frozenset(codings_of_list(condition.bodySite)),
                )
            )
    facts.primary_diagnosis = min(primary_dates, default=None)
    facts.primary_onset = min(onsets, default=None)
    facts.primaries.sort()
    facts.metastases.sort(key=lambda m: (m.organ or "~", m.detected or dt.date.max, m.source or ""))
    return staged


# --- procedures --------------------------------------------------------------------------------


def _read_procedures(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
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
        procedure = _validated(Procedure, raw, facts)
        if procedure is None or procedure.status in _EXCLUDED_PROCEDURE:
            continue
        source, when = ref_of(procedure), _procedure_date(procedure)
        label = display_of(procedure.code) or "procedure"
        done = procedure.status == "completed"
        if systemic:
            # Chemotherapy charted as given (terminology.md §7): dates systemic therapy like an
            # administration does (§8.4). In preparation, it has not been given yet.
            if procedure.status != "preparation":
                drug = _chemotherapy_label(procedure.code)
                facts.systemic.append(SystemicTherapy(source, drug, when, "chemotherapy procedure code"))
            continue
        if resection or excision:
            if done:  # only a completed resection dates the DFI
                target = facts.resections if resection else facts.local_excisions
                target.append(DatedProcedure(source, when, label))
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


# --- observations ------------------------------------------------------------------------------

_AJCC_N = re.compile(r"^(?P<prefix>yp|yc|p|c)?N(?P<n>X|[0-3])", re.IGNORECASE)
_AJCC_STAGE = re.compile(r"^(?P<prefix>yp|yc|p|c)?(?:stage\s*)?(?P<g>IV|III|II|I|[1-4])(?:[A-C]\d?)?$", re.I)
_ARABIC = {"1": "I", "2": "II", "3": "III", "4": "IV"}
_PREFIX_KIND = {"p": "pathologic", "yp": "pathologic", "c": "clinical", "yc": "clinical"}


def _fmt(number: float) -> str:
    return f"{number:.6g}"


_COMPARATORS = {"<", "<=", ">", ">="}


def _text(value: Any) -> str | None:
    """A raw JSON value that must be a string (a code, a status), else None."""
    return value if type(value) is str else None


def _list(value: Any) -> list:
    """A raw JSON value that must be an array, else empty."""
    return value if type(value) is list else []


_LARGEST_INT = int(sys.float_info.max)


def _measured_number(value: Any) -> float | None:
    """A concentration or a size: a finite number, not negative (a JSON boolean is not a number)."""
    if type(value) is not float and (type(value) is not int or value > _LARGEST_INT):
        return None  # a string, a boolean, or an integer beyond any float
    # NaN fails both comparisons; infinity the second.
    return float(value) if 0 <= value < math.inf else None


def _unit_text(value: Any) -> str | None:
    return value.strip() or None if type(value) is str else None


def _cea_from_raw(raw: dict[str, Any], term: Terminology, unconvertible: bool) -> CeaResult:
    # Runs once per CEA result of the chart (hundreds in a long follow-up): kept to plain dict reads.
    source = ref_of(raw)
    period = raw.get("effectivePeriod")
    when = as_date(
        raw.get("effectiveDateTime")
        or (period.get("start") if type(period) is dict else None)
        or raw.get("effectiveInstant")
        or raw.get("issued")
    )
    quantity = raw.get("valueQuantity")
    value = _measured_number(quantity.get("value") if type(quantity) is dict else None)
    if value is None:
        text = raw.get("valueString")
        shown = text if isinstance(text, str) else "no value"
        return CeaResult(source, when, None, None, shown, "not a numeric result", raw)
    comparator = quantity.get("comparator")
    comparator = comparator if type(comparator) is str and comparator in _COMPARATORS else None
    code = _unit_text(quantity.get("code"))
    system = quantity.get("system")
    # A UCUM code says exactly what the unit is; otherwise the human-readable unit, then any code.
    unit = (
        (code if type(system) is str and system in term.ucum_systems else None)
        or _unit_text(quantity.get("unit"))
        or code
    )
    shown = f"{comparator or ''}{_fmt(value)} {unit or '(no unit)'}"
    if unconvertible:
        why = (
            f"reported in {unit or 'molar or arbitrary units'}: converting it to ng/mL needs a molar "
            "mass or assay calibrator"
        )
        return CeaResult(source, when, None, comparator, shown, why, raw)
    factor = term.cea_units.get(term.cea_unit_aliases.get(unit or "", unit or ""))
    if factor is None:
        why = f"unit {unit!r} cannot be converted to ng/mL" if unit else "no unit given"
        return CeaResult(source, when, None, comparator, shown, why, raw)
    if when is None:
        return CeaResult(source, None, None, comparator, shown, "no date", raw)
    return CeaResult(source, when, value * factor, comparator, shown, None, raw)


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


def _read_observations(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    index = term.observation_index
    staging: list[tuple[Observation, str, str]] = []
    for raw in chart.of_type("Observation"):
        # The hot loop of large charts (every Observation passes here): one dict lookup per coding,
        # inline, since a call per Observation costs a quarter of the loop.
        code, concept = raw.get("code"), None
        codings_ = code.get("coding") if type(code) is dict else None
        if type(codings_) is list:
            for coding in codings_:
                if type(coding) is dict:
                    try:
                        concept = index.get((coding.get("system"), coding.get("code")))
                    except TypeError:  # a list or an object where a string belongs
                        continue
                    if concept is not None:
                        break
        if concept is None:
            continue
        what, kind = concept
        if not chart.claim(raw):
            continue
        if what == "size":
            size = _tumor_size(raw, facts, term)
            if size is not None:
                facts.tumor_sizes.append(size)
            continue
        if what == "cea":
            # Read from the raw JSON: a long CEA history is validated lazily (_validate_used_cea).
            if _text(raw.get("status")) in term.cea_statuses:
                facts.cea.append(_cea_from_raw(raw, term, unconvertible=kind == "unconvertible"))
            continue
        observation = _validated(Observation, raw, facts)
        if observation is not None and observation.status in term.tnm_statuses:
            staging.append((observation, what, kind))
    # By date, then value, then source: the CEA rule's order (factors.pick_cea picks the last).
    facts.cea.sort(
        key=lambda c: (c.date or dt.date.min, -1.0 if c.ng_ml is None else c.ng_ml, c.source or "")
    )
    _read_staging(staging, term, facts, _OtherDiseases(chart, term))


class _OtherDiseases:
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


def _read_staging(
    staging: list[tuple[Observation, str, str]], term: Terminology, facts: PatientFacts, other: _OtherDiseases
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
        source, when = ref_of(observation), _observation_date(observation)
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
            value_kind, group, shown = _stage_value(observation.valueCodeableConcept, term)
            if group is not None:
                facts.nodal.append(NodalEvidence(source, when, value_kind or kind, "stage", group, shown))


_CM_PER_UNIT = {"cm": 1.0, "mm": 0.1}


def _tumor_size(raw: dict[str, Any], facts: PatientFacts, term: Terminology) -> TumorSize | None:
    """mCODE TumorSize: the longest dimension (component 33728-7), in cm."""
    observation = _validated(Observation, raw, facts)
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
    size = _measured_number(raw_quantity.get("value") if type(raw_quantity) is dict else None)
    unit = quantity.code or quantity.unit
    factor = _CM_PER_UNIT.get(unit or "")
    if factor is None or not size:
        return None  # mCODE allows only mm and cm; a size is a positive number
    focus = frozenset(reference_targets(observation.focus))
    return TumorSize(ref_of(observation), _observation_date(observation), size * factor, focus)


def _read_tumors(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    """mCODE Tumor BodyStructures: one per lesion; their location or related Condition gives the organ."""
    met_organs = {m.source: m.organ for m in facts.metastases if m.source}
    for raw in chart.of_type("BodyStructure"):
        if raw.get("active") is False or not chart.claim(raw):
            continue
        structure = _validated(BodyStructure, raw, facts)
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


# --- systemic therapy (MedicationRequest / Administration / Statement) --------------------------------

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
                (c for c in _list(raw.get("contained")) if isinstance(c, dict) and c.get("id") == target[1:]),
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
        for ingredient in _list(medication.get("ingredient")):
            if isinstance(ingredient, dict):
                drug = term.drug_of_codings(raw_codings(ingredient.get("itemCodeableConcept")))
                if drug:
                    return drug, "Medication ingredient"
    texts = []
    if isinstance(concept, dict):
        texts.append(concept.get("text") or "")
        texts.extend(c.get("display") or "" for c in _list(concept.get("coding")) if isinstance(c, dict))
    if isinstance(ref, dict):
        texts.append(ref.get("display") or "")
    for text in texts:
        drug = term.drug_of_text(text if isinstance(text, str) else "")
        if drug:
            return drug, "drug name"
    return None


def _therapy_start(resource: Any) -> dt.date | None:
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
    found = [d for d in (as_date(v) for v in dates) if d is not None]
    return min(found, default=None)


def _read_systemic_therapy(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    medications = _medications_by_reference(chart)
    for rtype, model in _MEDICATION_MODELS.items():
        ignored = term.medication_statuses_ignored[rtype]
        for raw in chart.of_type(rtype):
            if _text(raw.get("status")) in ignored:
                continue
            hit = _drug(raw, medications, term)
            if hit is None or not chart.claim(raw):
                continue
            resource = _validated(model, raw, facts)
            if resource is None:
                # A drug order that cannot be read is still therapy of unknown start: the CEA rule
                # then treats it as undated (§8.4), never as no therapy at all.
                facts.systemic.append(
                    SystemicTherapy(ref_of(raw), hit[0], None, f"{hit[1]} (not valid FHIR R4)")
                )
                continue
            facts.systemic.append(SystemicTherapy(ref_of(resource), hit[0], _therapy_start(resource), hit[1]))
    facts.systemic.sort(key=lambda t: (t.start or dt.date.max, t.source or ""))


def _read_planned_local_therapy(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    """ServiceRequests for lung (or liver) ablation / SBRT not yet done: treatment planned."""
    lung_sources = {m.source for m in facts.sites("lung") if m.source}
    kinds = term.local_therapy_by_tag
    for raw in chart.of_type("ServiceRequest"):
        if _text(raw.get("status")) not in term.planned_request_statuses:
            continue
        tags = [t for t in term.procedure_tags(raw_codings(raw.get("code"))) if t in kinds]
        if not tags or not chart.claim(raw):
            continue
        request = _validated(ServiceRequest, raw, facts)
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


def _validate_used_cea(facts: PatientFacts, cutoffs: set[dt.date | None]) -> None:
    """Validate, with fhir.resources, each CEA a CEA rule could pick (the latest before each cutoff).

    A picked result that is not valid FHIR becomes unreadable and the next one is tried, so the
    clinical core only ever uses validated CEA Observations.
    """
    checked: set[int] = set()
    for cutoff in cutoffs:
        while True:
            candidates = [
                r for r in facts.cea if r.ng_ml is not None and r.date and (cutoff is None or r.date < cutoff)
            ]
            if not candidates:
                break
            pick = candidates[-1]  # facts.cea is in the rule's order
            if id(pick) in checked:
                break
            checked.add(id(pick))
            if _validated(Observation, pick.raw, facts) is not None:
                break
            index = facts.cea.index(pick)
            facts.cea[index] = replace(pick, ng_ml=None, unreadable="not valid FHIR R4")
            checked.add(id(facts.cea[index]))


def _read_condition_stages(staged: list[Condition], term: Terminology, facts: PatientFacts) -> None:
    """Condition.stage.summary of the colorectal primary (plain US Core data).

    `staged`: the primary's Conditions as validated by _read_conditions, in chart order (they are
    not validated a second time).
    """
    for condition in staged:
        for stage in condition.stage or []:
            value_kind, group, shown = _stage_value(stage.summary, term)
            if group is None:
                continue
            type_kind = _kind_of(codings(stage.type), term.stage_group)
            kind = value_kind or type_kind or "unspecified"
            facts.nodal.append(
                NodalEvidence(ref_of(condition), _condition_date(condition), kind, "stage", group, shown)
            )


def _deceased(patient: dict[str, Any] | None) -> bool:
    if not patient:
        return False
    # A deceasedDateTime counts only as a date: "unknown" or a stray object is not a death.
    return patient.get("deceasedBoolean") is True or as_date(patient.get("deceasedDateTime")) is not None


def derive_facts(chart: Chart, term: Terminology | None = None) -> PatientFacts:
    term = term or terminology()
    facts = PatientFacts(patient_id=chart.patient_id, deceased=_deceased(chart.patient))
    staged = _read_conditions(chart, term, facts)
    if not facts.in_scope:
        return facts  # quiet and fast: nothing more to read
    _read_procedures(chart, term, facts)
    _read_planned_local_therapy(chart, term, facts)
    facts.local_therapies.sort(key=lambda p: (p.date or dt.date.max, p.source or ""))
    _read_systemic_therapy(chart, term, facts)
    _read_observations(chart, term, facts)
    _validate_used_cea(facts, {None} | {facts.treatment_cutoff(o)[0] for o in ("lung", "liver")})
    _read_condition_stages(staged, term, facts)
    _read_tumors(chart, term, facts)
    facts.tumor_sizes.sort(key=lambda s: (s.date or dt.date.min, s.source or ""))
    facts.nodal.sort(key=lambda n: (n.date or dt.date.min, n.source or ""))
    return facts

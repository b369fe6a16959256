"""The facts read from a chart (docs/clinical-rules.md §2): typed, each with the resource it comes from."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from cds_service.clinical.knowledge.terminology import Coding


@dataclass(frozen=True)
class Metastasis:
    source: str | None
    organ: str | None  # None: the Condition codes no site we can read
    display: str
    region: str  # lung | thoracic | extrapulmonary | unknown
    detected: dt.date | None
    kind: str = "site"  # site | lymphangitic | pleural-effusion
    body_sites: frozenset[Coding] = frozenset()  # Condition.bodySite codings (distinct lesions, §8.16)
    side: str | None = None  # lung metastases: "left" | "right" when the code or body site says
    detected_last: dt.date | None = None  # a partial date's last day (§8.25); None: `detected` exactly
    status: str | None = None  # "unconfirmed" | "resolved" (context, §8.27), else None


@dataclass(frozen=True)
class DatedProcedure:
    source: str | None
    date: dt.date | None
    display: str
    kind: str = ""
    organ: str = ""
    done: bool = True
    date_last: dt.date | None = None  # a partial date's last day (§8.25); None: `date` exactly


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
    instant: dt.datetime | None = (
        None  # in UTC, when the result carries a time (docs/clinical-rules.md §8.24)
    )
    date_last: dt.date | None = None  # a partial date's last day (§8.25); None: `date` exactly

    @property
    def surely_before(self) -> dt.date | None:
        """The last day the result may have been drawn on."""
        return self.date_last or self.date


def latest_cea(candidates: list[CeaResult]) -> tuple[CeaResult, list[CeaResult]]:
    """The latest of `candidates` (non-empty, in facts.observations.sort_cea's order): the last one,
    unless a result dated only by month or year may be later than it (its range reaches the last
    one's day). Results that cannot be put in order tie and the higher counts (§8.24, §8.25).
    Returns the pick and, when there was such a tie, the results it was chosen among."""
    last = candidates[-1]
    day = last.date or dt.date.min
    rivals = [r for r in candidates[:-1] if r.date_last is not None and r.date_last >= day]
    if not rivals:
        return last, []
    group = [*rivals, last]
    return max(group, key=lambda r: (r.ng_ml or 0.0, r.source or "")), group


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
    date_last: dt.date | None = None  # a partial date's last day (§8.25); None: `date` exactly


@dataclass(frozen=True)
class SystemicTherapy:
    """One order / administration / statement of a colorectal systemic-therapy drug, or one
    chemotherapy procedure."""

    source: str | None
    drug: str
    start: dt.date | None  # its earliest date in the chart (docs/clinical-rules.md §8.4)
    matched_by: str  # "RxNorm code" | "Medication ingredient" | "drug name" | "chemotherapy procedure code"
    start_last: dt.date | None = None  # the last day `start` may stand for (a partial date, §8.25)

    @property
    def latest_start(self) -> dt.date | None:
        return self.start_last or self.start


@dataclass(frozen=True)
class Entry:
    """A chart entry shown as context (docs/clinical-rules.md §8.26, §8.27): where it is and what it says."""

    source: str | None
    text: str
    date: dt.date | None = None


@dataclass
class PatientFacts:
    patient_id: str
    deceased: bool = False
    primaries: list[str] = field(default_factory=list)
    primary_diagnosis: dt.date | None = None
    # The earliest onset of the primary (not its recordedDate, which may come long after).
    primary_onset: dt.date | None = None
    primary_diagnosis_last: dt.date | None = None  # the last day primary_diagnosis may be (§8.25)
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
    # Context (docs/clinical-rules.md §8.26, §8.27, §8.29): shown on the card, never scored, never scope.
    birth_date: dt.date | None = None
    birth_date_last: dt.date | None = None  # a partial birthDate's last day (`1950`: 1950-12-31)
    rectal_primary: list[str] = field(default_factory=list)  # sources
    other_primaries: list[Entry] = field(default_factory=list)
    text_metastases: list[Entry] = field(default_factory=list)  # metastases recorded only as text
    history: list[Metastasis] = field(default_factory=list)  # mCODE HistoryOfMetastaticCancer
    molecular: list[Entry] = field(default_factory=list)
    # Resource types the EHR's FHIR server would not give (Chart.unread): their absence proves nothing.
    unread: frozenset[str] = frozenset()

    @property
    def medications_unread(self) -> bool:
        """Systemic therapy may be missing: some medication records could not be read."""
        return bool(self.unread & MEDICATION_TYPES)

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

    def detected_range(self, organ: str) -> tuple[dt.date | None, dt.date | None]:
        """The first and the last day the organ's first detection may have been (partial dates)."""
        dated = [m for m in self.sites(organ) if m.detected]
        if not dated:
            return None, None
        return min(m.detected for m in dated if m.detected), min(
            m.detected_last or m.detected for m in dated if m.detected
        )

    def systemic_since(self, organ: str) -> list[SystemicTherapy]:
        """Systemic therapy that may have started on or after the organ's metastases were found
        (therapy for them). A partial start date (`2021`) that reaches the detection day counts:
        only therapy surely begun before the metastases is adjuvant (docs/clinical-decisions.md)."""
        detected, _ = self.detected(organ)
        if detected is None:
            return []
        return [t for t in self.systemic if t.latest_start is not None and t.latest_start >= detected]

    def systemic_before(self, organ: str) -> list[SystemicTherapy]:
        """Systemic therapy surely begun before the organ's metastases were found (adjuvant)."""
        detected, _ = self.detected(organ)
        if detected is None:
            return []
        return [t for t in self.systemic if t.latest_start is not None and t.latest_start < detected]

    def resection_range(self) -> tuple[list[DatedProcedure], dt.date | None, dt.date | None]:
        """The dated primary resections that may be the first, and the first and last day the first
        resection may have been (partial dates are ranges, §8.25): `2019` beside 2019-03-10 puts it
        between 2019-01-01 and 2019-03-10."""
        dated = [r for r in self.resections if r.date]
        if not dated:
            return [], None, None
        first = min(r.date for r in dated if r.date)
        last = min(r.date_last or r.date for r in dated if r.date)
        return [r for r in dated if r.date and r.date <= last], first, last

    def treatment_cutoff(self, organ: str) -> tuple[dt.date | None, str]:
        """When treatment of the organ's metastases began, and what began (docs/clinical-rules.md §8.4, §8.19):
        the first local therapy done, or the start of systemic therapy for the metastases.

        A therapy with no date may have begun any day since the metastases were found, so then
        their detection is the cutoff: only a CEA from before it is surely not on treatment
        (dt.date.min when the detection is undated too: no CEA can be placed before treatment).
        A partial date counts from its first day; a therapy whose partial start reaches back before
        the detection counts from the detection (the first day it may have been for the metastases).
        """
        detected, _ = self.detected(organ)
        candidates = [(t.date, f"first {t.display}") for t in self.therapies(organ, done=True) if t.date]
        candidates += [
            (max(t.start, detected) if detected else t.start, "start of systemic therapy")
            for t in self.systemic_since(organ)
            if t.start
        ]
        undated = [t.display for t in self.therapies(organ, done=True) if t.date is None]
        undated += ["systemic therapy" for t in self.systemic if t.start is None]
        if undated:
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


# The resource types systemic therapy is read from (a Medication names the drug of an order).
MEDICATION_TYPES = frozenset(
    {"MedicationRequest", "MedicationAdministration", "MedicationStatement", "Medication"}
)

# The display of a metastasis Condition that could not be read (not valid FHIR).
UNREADABLE = "not valid FHIR R4"

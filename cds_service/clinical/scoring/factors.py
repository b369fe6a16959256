"""Risk factors derived from PatientFacts: present / absent / unknown, each with provenance.

Shared by the lung model and the liver score. Pure functions; every threshold is a parameter.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, replace

from cds_service.clinical.facts.model import CeaResult, NodalEvidence, PatientFacts, latest_cea
from cds_service.clinical.fhir_fields import ref_of

DAYS_PER_MONTH = 30.4375

PRESENT, ABSENT, UNKNOWN = "present", "absent", "unknown"


@dataclass(frozen=True)
class Factor:
    id: str
    status: str
    value: str | None = None
    date: dt.date | None = None
    sources: tuple[str, ...] = ()
    reason: str | None = None

    def assessment(self) -> dict:
        """The factor as the `crc-cds-assessment` extension carries it (docs/service-contract.md)."""
        return {
            "id": self.id,
            "status": self.status,
            "value": self.value,
            "date": self.date.isoformat() if self.date else None,
            "sources": list(self.sources),
            "reason": self.reason if self.status == UNKNOWN else None,
        }


def months_between(start: dt.date, end: dt.date) -> float:
    return (end - start).days / DAYS_PER_MONTH


def months_text(months: float) -> str:
    """Months to one decimal, rounded down: 730 days (23.98 months, under 24) must not read "24.0"."""
    return f"{math.floor(months * 10 + 1e-9) / 10:.1f} months"


def threshold_status(value: float, comparator: str | None, threshold: float) -> str:
    """Whether a result is above `threshold` ("> threshold" is the factor), honouring comparators.

    A comparator decides only when every value it allows falls on one side (docs/clinical-rules.md §8.12).
    """
    if comparator is None:
        return PRESENT if value > threshold else ABSENT
    if comparator in ("<", "<="):
        return ABSENT if value <= threshold else UNKNOWN
    if comparator == ">":
        return PRESENT if value >= threshold else UNKNOWN
    if comparator == ">=":
        return PRESENT if value > threshold else UNKNOWN
    return UNKNOWN


# --- disease-free interval -----------------------------------------------------------------------


def disease_free_interval(facts: PatientFacts, organ: str, factor_id: str, limit_months: float) -> Factor:
    """DFI from the primary resection to the first detection of `organ` metastases (Cai 2025).

    Detected on or before the resection: DFI 0, factor present (docs/clinical-rules.md §8.2).
    """
    detected, met_sources = facts.detected(organ)
    dated = [r for r in facts.resections if r.date]
    if not facts.resections:
        if facts.local_excisions:
            srcs = tuple(p.source for p in facts.local_excisions if p.source)
            return Factor(
                factor_id,
                UNKNOWN,
                sources=srcs,
                reason="only a polypectomy / local excision in the chart, which is not a primary "
                "tumour resection",
            )
        return Factor(factor_id, UNKNOWN, reason="no primary tumour resection in the chart")
    if not dated:
        srcs = tuple(p.source for p in facts.resections if p.source)
        return Factor(factor_id, UNKNOWN, sources=srcs, reason="the primary tumour resection has no date")
    if detected is None:
        return Factor(
            factor_id,
            UNKNOWN,
            sources=tuple(met_sources),
            reason=f"the {organ} metastasis has no onset or recorded date",
        )
    firsts, resected, resected_last = facts.resection_range()
    assert resected is not None  # `dated` holds dated resections only
    sources = tuple(s for s in (*(r.source for r in firsts), *met_sources) if s)
    ranged = interval_over_ranges(
        factor_id,
        ("the primary resection", resected, resected_last),
        (f"the {organ} metastasis", *facts.detected_range(organ)),
        limit_months,
        detected,
        sources,
    )
    if ranged is not None:
        return ranged
    months = months_between(resected, detected)
    if months <= 0:
        return Factor(
            factor_id,
            PRESENT,
            f"0 months ({organ} metastasis found on or before the primary "
            f"resection of {resected.isoformat()})",
            detected,
            sources,
        )
    status = PRESENT if months < limit_months else ABSENT
    return Factor(
        factor_id,
        status,
        f"{months_text(months)} (resection {resected.isoformat()})",
        detected,
        sources,
    )


def _range(what: str, first: dt.date, last: dt.date) -> str:
    return f"{what} is recorded as {first.isoformat()} to {last.isoformat()}"


def interval_over_ranges(
    factor_id: str,
    start: tuple[str, dt.date, dt.date | None],
    end: tuple[str, dt.date | None, dt.date | None],
    limit_months: float,
    detected: dt.date | None,
    sources: tuple[str, ...],
) -> Factor | None:
    """An interval threshold ("< limit months") when a date is partial (docs/clinical-rules.md §8.25).

    `start` and `end`: (what, first day, last day). A partial date is a range; the factor is decided
    only when every day of the ranges gives the same answer, else unknown with the ranges shown.
    None when both dates are exact days (the caller computes as usual)."""
    what_start, s0, s1 = start
    what_end, e0, e1 = end
    s1, e1 = s1 or s0, e1 or e0
    if e0 is None or e1 is None or (s1 == s0 and e1 == e0):
        return None
    shortest, longest = months_between(s1, e0), months_between(s0, e1)
    ranges = "; ".join(
        _range(what, first, last)
        for what, first, last in ((what_start, s0, s1), (what_end, e0, e1))
        if first != last
    )
    span = f"{months_text(max(shortest, 0))} to {months_text(max(longest, 0))}"
    low, high = (PRESENT if m < limit_months else ABSENT for m in (shortest, longest))
    if low != high:
        return Factor(
            factor_id,
            UNKNOWN,
            sources=sources,
            reason=f"{ranges}: the interval is {span}, either side of {limit_months:g} months",
        )
    return Factor(factor_id, low, f"{span} ({ranges})", detected, sources)


# --- nodal status ----------------------------------------------------------------------------------


def node_positive_primary(facts: PatientFacts, factor_id: str = "node_positive_primary") -> Factor:
    """Pathologic N over clinical N; stage group III means node-positive (docs/clinical-rules.md §8.5, §8.14)."""
    evidence = facts.nodal

    def latest(kind: str, what: str, informative: bool = True):
        picked = [
            e for e in evidence if e.kind == kind and e.what == what and (not informative or e.value != "X")
        ]
        return picked[-1] if picked else None  # evidence is sorted by date

    def n_factor(e) -> Factor:
        status = PRESENT if e.value in ("1", "2", "3") else ABSENT
        return Factor(
            factor_id,
            status,
            _n_shown(e),
            e.date,
            (e.source,) if e.source else (),
        )

    def stage_factor(e, status: str) -> Factor:
        return Factor(
            factor_id,
            status,
            _stage_shown(e),
            e.date,
            (e.source,) if e.source else (),
        )

    if e := latest("pathologic", "N"):
        return n_factor(e)
    pnx = latest("pathologic", "N", informative=False)
    clinical_n = latest("clinical", "N")
    if e := latest("pathologic", "stage"):
        if e.value == "III":
            return stage_factor(e, PRESENT)
        # §8.5: a stage I/II means node-negative only "with no N category" (and when pathologic):
        # a recorded clinical N decides instead, and a pNX says the nodes were not assessed (§8.14).
        if e.value in ("I", "II") and pnx is None and not clinical_n and not latest("unspecified", "N"):
            return stage_factor(e, ABSENT)
    stage_iii = [e for e in evidence if e.what == "stage" and e.value == "III"]
    if clinical_n and clinical_n.value != "0":
        return n_factor(clinical_n)
    if stage_iii:
        return stage_factor(stage_iii[-1], PRESENT)
    if clinical_n:
        return n_factor(clinical_n)
    if e := latest("unspecified", "N"):
        return n_factor(e)
    if pnx:
        return Factor(
            factor_id,
            UNKNOWN,
            sources=(pnx.source,) if pnx.source else (),
            reason="pathologic NX (nodes not assessed) and no clinical N category in the chart",
        )
    stages = [e for e in evidence if e.what == "stage"]
    if stages:
        e = stages[-1]
        return Factor(
            factor_id,
            UNKNOWN,
            sources=(e.source,) if e.source else (),
            reason=f"no N category; {_stage_shown(e)} does not settle nodal status",
        )
    return Factor(
        factor_id, UNKNOWN, reason="no N category or stage group of the colorectal cancer in the chart"
    )


def _kind_prefix(kind: str) -> str:
    return {"pathologic": "p", "clinical": "c"}.get(kind, "")


def _stage_shown(e: NodalEvidence) -> str:
    """The stage as charted, with its kind: "pathologic stage IIIB (AJCC)", or "stage IIIB (AJCC)"."""
    shown = e.shown or f"stage {e.value}"
    return shown if e.kind == "unspecified" else f"{e.kind} {shown}"


def _n_shown(e: NodalEvidence) -> str:
    """The N category as charted ("pN2b"); a bare "N2b" under a pN code reads "pN2b"."""
    if not e.shown:
        return f"{_kind_prefix(e.kind)}N{e.value}"
    if e.shown[:1].upper() == "N":
        return _kind_prefix(e.kind) + e.shown
    return e.shown


# --- CEA -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CeaPick:
    """Which CEA the rule picked (or why none), and what the card must say about the others."""

    result: CeaResult | None
    rule: str
    picked_latest: bool
    not_used: list[CeaResult] = field(default_factory=list)
    reason: str | None = None


@dataclass(frozen=True)
class Assessment:
    """What every risk model reports: factors, score range, group, recommendation and the CEA used."""

    factors: tuple[Factor, ...]
    score_min: int
    score_max: int
    group: str
    recommendation: str
    cea: CeaPick
    reasons_not_oligometastatic: tuple[str, ...]

    @property
    def unknown(self) -> tuple[Factor, ...]:
        return tuple(f for f in self.factors if f.status == UNKNOWN)

    @property
    def present(self) -> tuple[Factor, ...]:
        return tuple(f for f in self.factors if f.status == PRESENT)


def cite_assessed(
    factors: tuple[Factor, ...], assessed: dict[str, tuple[str, ...]], patient_id: str
) -> tuple[Factor, ...]:
    """Every factor cites at least one resource (docs/service-contract.md: `sources` are Type/id).

    A factor that rests on an absence ("no CEA in the chart", "no site outside the lung") has no
    evidence of its own: it cites what it was assessed for — the metastasis or primary Conditions,
    or, when those carry no id to cite, the patient.
    """
    patient = ref_of({"resourceType": "Patient", "id": patient_id})
    fallback = (patient,) if patient else ()
    return tuple(f if f.sources else replace(f, sources=assessed.get(f.id) or fallback) for f in factors)


def score_range(factors: tuple[Factor, ...]) -> tuple[int, int]:
    """[present, present + unknown]: what the score is, and what it could be."""
    present = sum(f.status == PRESENT for f in factors)
    return present, present + sum(f.status == UNKNOWN for f in factors)


def pick_cea(results: list[CeaResult], before: dt.date | None, before_what: str = "") -> CeaPick:
    """The latest readable CEA dated before `before` when given, else the latest (docs/clinical-rules.md §8.4, §8.13).

    `results` in PatientFacts.cea's order (facts.observations.sort_cea): by day, then by time when
    every result of the day has one, else by value. Results are dated calendar days: a CEA on the
    day of the therapy is not "before" it. Same-day ties go to the higher value, so a tie can never
    make a patient look lower-risk.
    """
    readable = [r for r in results if r.ng_ml is not None and r.date]
    if before is not None:
        # A partial date (`2021-05`) is before the cutoff only when its last day is (§8.25).
        candidates = [r for r in readable if r.surely_before is not None and r.surely_before < before]
        # dt.date.min: treatment began on a day nobody recorded (facts.treatment_cutoff).
        on = f" on {before.isoformat()}" if before > dt.date.min else ""
        rule = f"latest CEA before the {before_what or 'start of treatment'}{on}"
    else:
        candidates = readable
        rule = "latest CEA in the chart"
    picked, tied = latest_cea(candidates) if candidates else (None, [])
    if tied and picked is not None:
        rule += f"; {len(tied)} results whose dates cannot be put in order (dated only by month or year): the higher is used"
    elif picked is not None:
        same_day = [r for r in candidates if r.date == picked.date]
        if len(same_day) > 1 and any(r.instant is None for r in same_day):
            # Results of one day that cannot be put in order tie; the card names it (§8.24).
            rule += (
                f"; {len(same_day)} results on {picked.date} without times to order them: the higher is used"
            )
    cutoff = picked.date if picked and picked.date else dt.date.min
    not_used = [
        r
        for r in results
        if r.unreadable
        and (r.date is None or r.date >= cutoff)
        and (before is None or r.date is None or (r.surely_before or r.date) < before)
    ]
    if picked is None:
        if before is not None and readable:
            reason = f"no CEA before the {before_what}{on} " + (
                "(the later result may reflect treatment)"
                if len(readable) == 1
                else f"(the {len(readable)} later results may reflect treatment)"
            )
        elif not_used:
            reason = "no CEA result that can be read: " + "; ".join(
                f"{r.shown} ({r.unreadable})" for r in not_used[:3]
            )
        else:
            reason = "no serum CEA result in the chart"
        return CeaPick(None, rule, before is None, not_used, reason)
    return CeaPick(picked, rule, before is None, not_used)


def cea_factor_unchecked(
    factor: Factor, pick: CeaPick, facts: PatientFacts, organ: str, threshold: float
) -> Factor:
    """The CEA factor when medication records could not be read (docs/clinical-decisions.md, "Data the
    FHIR server would not give"): systemic therapy for the metastases may then have begun on any day
    since they were found, and the rule of §8.4 would pick the last CEA before it. The factor stands
    only when every CEA the rule could so have picked — the last one of each day, from the last one
    before the detection to the one picked — gives the same answer (as partial dates do, §8.25)."""
    picked = pick.result
    if not facts.medications_unread or picked is None or factor.status == UNKNOWN:
        return factor
    readable = [r for r in facts.cea if r.ng_ml is not None and r.date]
    end = next(i for i, r in enumerate(readable) if r is picked)
    detected, _ = facts.detected(organ)
    before = [
        i for i, r in enumerate(readable[:end]) if detected is not None and r.date and r.date < detected
    ]
    last_of_day = {r.date: r for r in readable[before[-1] if before else 0 : end + 1]}
    differ = [
        r
        for r in last_of_day.values()
        if r.ng_ml is not None and threshold_status(r.ng_ml, r.comparator, threshold) != factor.status
    ]
    if not differ:
        return factor
    other = differ[-1]
    assert picked.date is not None and other.date is not None  # readable results are dated
    return replace(
        factor,
        status=UNKNOWN,
        sources=tuple(s for s in (other.source, picked.source) if s),
        reason=f"medication records not read: {picked.shown} ({picked.date.isoformat()}) may be on "
        f"treatment; {other.shown} on {other.date.isoformat()} before it",
    )


def cea_factor(pick: CeaPick, factor_id: str, threshold: float) -> Factor:
    result = pick.result
    if result is None:
        return Factor(
            factor_id, UNKNOWN, reason=pick.reason, sources=tuple(r.source for r in pick.not_used if r.source)
        )
    value = result.ng_ml
    assert value is not None
    shown = f"{result.comparator or ''}{value:.6g} ng/mL"
    if not result.shown.endswith(" ng/mL"):
        shown += f" (reported {result.shown})"
    status = threshold_status(value, result.comparator, threshold)
    reason = None
    if status == UNKNOWN:
        reason = f"{result.shown} does not say whether CEA is above {threshold:g} ng/mL"
    return Factor(factor_id, status, shown, result.date, (result.source,) if result.source else (), reason)

"""The Fong clinical risk score for liver metastases, as defined by Chen et al. 2025,
and the liver recommendation (docs/clinical-rules.md §5, §8.7–9, §8.18–19).

Pure: PatientFacts (and the lung verdict, when there is one) in, LiverAssessment out.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cds_service.clinical.facts.model import DatedProcedure, PatientFacts, SystemicTherapy, Tumor, TumorSize
from cds_service.clinical.knowledge.thresholds import LiverParams, group_of, liver_params
from cds_service.clinical.scoring.context import ContextLine, context_lines, quoted
from cds_service.clinical.scoring.factors import (
    ABSENT,
    PRESENT,
    UNKNOWN,
    Assessment,
    Factor,
    cea_factor,
    cea_factor_unchecked,
    cite_assessed,
    interval_over_ranges,
    months_between,
    months_text,
    node_positive_primary,
    pick_cea,
    score_range,
)

FACTOR_IDS = (
    "node_positive_primary",
    "dfi_lt_12m",
    "multiple_liver_metastases",
    "cea_gt_200",
    "largest_liver_metastasis_gt_5cm",
)


@dataclass(frozen=True)
class LiverAssessment(Assessment):
    extrahepatic_organs: tuple[str, ...]
    liver_detected: dt.date | None
    liver_sources: tuple[str, ...]
    lung_involved: bool
    local_therapy_done: tuple[DatedProcedure, ...]
    systemic: tuple[SystemicTherapy, ...] = ()  # started on or after the liver-metastasis date
    context: tuple[ContextLine, ...] = ()  # shown, never scored (docs/clinical-rules.md §8.27)


def liver_timing_factor(facts: PatientFacts, params: LiverParams) -> Factor:
    """Liver metastasis found before, or within 12 months after, the primary resection; without a
    resection date, within 12 months of the primary diagnosis (docs/clinical-rules.md §8.3)."""
    fid = "dfi_lt_12m"
    detected, sources = facts.detected("liver")
    if detected is None:
        return Factor(
            fid, UNKNOWN, sources=tuple(sources), reason="the liver metastasis has no onset or recorded date"
        )
    firsts, resected, resected_last = facts.resection_range()
    resection = firsts[0] if firsts else None
    if resection is not None and resection.date is not None and resected is not None:
        refs = tuple(s for s in (*(r.source for r in firsts), *sources) if s)
        ranged = interval_over_ranges(
            fid,
            ("the primary resection", resected, resected_last),
            ("the liver metastasis", *facts.detected_range("liver")),
            params.dfi_limit_months,
            detected,
            refs,
        )
        if ranged is not None:
            return ranged
        months = months_between(resection.date, detected)
        if months <= 0:
            return Factor(
                fid,
                PRESENT,
                f"found on or before the primary resection of {resection.date.isoformat()}",
                detected,
                refs,
            )
        status = PRESENT if months < params.dfi_limit_months else ABSENT
        return Factor(fid, status, f"{months_text(months)} after the primary resection", detected, refs)
    if facts.primary_diagnosis is not None:
        refs = tuple(s for s in (*facts.primaries[:1], *sources) if s)
        ranged = interval_over_ranges(
            fid,
            ("the primary diagnosis", facts.primary_diagnosis, facts.primary_diagnosis_last),
            ("the liver metastasis", *facts.detected_range("liver")),
            params.dfi_limit_months,
            detected,
            refs,
        )
        if ranged is not None:
            return ranged
        months = months_between(facts.primary_diagnosis, detected)
        status = PRESENT if months < params.dfi_limit_months else ABSENT
        return Factor(
            fid,
            status,
            f"{months_text(max(months, 0))} after the primary diagnosis (no resection date)",
            detected,
            refs,
        )
    return Factor(
        fid,
        UNKNOWN,
        sources=tuple(sources),
        reason="neither a primary resection date nor a primary diagnosis date in the chart",
    )


def _liver_lesions(facts: PatientFacts) -> tuple[list[Tumor], list[TumorSize]]:
    liver_conditions = {m.source for m in facts.sites("liver") if m.source}
    tumors = [t for t in facts.tumors if t.organ == "liver"]
    tumor_refs = {t.source for t in tumors}
    sizes = [s for s in facts.tumor_sizes if s.focus & (tumor_refs | liver_conditions)]
    return tumors, sizes


def _measured_together(sizes: list[TumorSize], tumors: list[Tumor]) -> list[TumorSize]:
    """The most TumorSize Observations taken on one day of the liver metastases with no Tumor record.

    Several sizes on one day are several lesions; one a day may be one lesion followed over time,
    so sizes on different days are never added up (and undated ones not counted).
    """
    tumor_refs = {t.source for t in tumors}
    by_day: dict[dt.date, list[TumorSize]] = {}
    for size in sizes:
        if size.date is not None and not size.focus & tumor_refs:
            by_day.setdefault(size.date, []).append(size)
    return max(by_day.values(), key=len, default=[])


def lesion_count_factor(facts: PatientFacts) -> Factor:
    """More than one liver metastasis: counted from distinct liver Tumor BodyStructures, TumorSize
    Observations of one day, or liver metastasis Conditions with different body sites; one Condition
    says nothing (§8.16)."""
    fid = "multiple_liver_metastases"
    tumors, sizes = _liver_lesions(facts)
    conditions = facts.sites("liver")
    sites = {m.body_sites for m in conditions if m.body_sites}
    measured = _measured_together(sizes, tumors)
    # Whichever evidence shows more lesions wins: one Tumor record must not outvote two sites.
    if len(sites) > 1 and len(sites) >= max(len(tumors), len(measured)):
        refs = tuple(sorted(m.source for m in conditions if m.source))
        return Factor(fid, PRESENT, f"liver metastases at {len(sites)} different sites", None, refs)
    if len(measured) > 1 and len(measured) >= len(tumors):
        refs = tuple(sorted(s.source for s in measured if s.source))
        when = measured[0].date
        return Factor(fid, PRESENT, f"{len(measured)} liver lesions measured on {when}", when, refs)
    if tumors:
        refs = tuple(t.source for t in tumors)
        if len(tumors) == 1 and facts.text_metastases:
            return _text_entry_unknown(fid, facts, "1 liver lesion recorded")
        status = PRESENT if len(tumors) > 1 else ABSENT
        return Factor(fid, status, f"{len(tumors)} liver lesion(s) recorded", None, refs)
    return Factor(
        fid,
        UNKNOWN,
        sources=tuple(m.source for m in conditions if m.source),
        reason="the number of liver metastases is not in the chart: the EHR's Tumor records "
        "(BodyStructure) could not be read"
        if "BodyStructure" in facts.unread
        else "the chart does not say how many liver metastases there are (no Tumor "
        "BodyStructures or lesion sites)",
    )


def _text_entry_unknown(fid: str, facts: PatientFacts, value: str) -> Factor:
    """A metastasis recorded only as text may be another liver lesion (§8.26): quoted, unknown."""
    return Factor(
        fid,
        UNKNOWN,
        value,
        sources=tuple(e.source for e in facts.text_metastases if e.source),
        reason="a chart entry recorded only as text may be another lesion: "
        + quoted([e.text for e in facts.text_metastases]),
    )


def _unmeasured_lesions(facts: PatientFacts, tumors: list[Tumor], sizes: list[TumorSize]) -> list[str]:
    """Known liver lesions no TumorSize measures: Tumor records, and liver-metastasis Conditions at
    distinct body sites (distinct lesions, §8.16) measured neither directly nor through a Tumor."""
    measured = set().union(*(s.focus for s in sizes))
    measured |= {ref for t in tumors if t.source in measured for ref in t.related}
    lesions = [t.source for t in tumors if t.source not in measured]
    by_site: dict[frozenset, set[str]] = {}
    for m in facts.sites("liver"):
        if m.body_sites and m.source:
            by_site.setdefault(m.body_sites, set()).add(m.source)
    if len(by_site) > 1:
        lesions += [min(refs) for refs in by_site.values() if not refs & measured]
    return lesions


def lesion_size_factor(facts: PatientFacts, params: LiverParams) -> Factor:
    """Largest liver metastasis > 5 cm, from mCODE TumorSize longest dimensions."""
    fid = "largest_liver_metastasis_gt_5cm"
    tumors, sizes = _liver_lesions(facts)
    if not sizes:
        return Factor(fid, UNKNOWN, reason="no liver tumour size (TumorSize longest dimension) in the chart")
    cutoff, what = facts.treatment_cutoff("liver")
    if cutoff is not None:
        # A lesion measured more than once: its size before treatment (§8.30, as the CEA rule §8.19).
        latest: dict[frozenset[str], TumorSize] = {}
        for size in sorted(sizes, key=lambda s: (s.date or dt.date.min, s.source or "")):
            if size.date is not None and (size.date_last or size.date) < cutoff:
                latest[size.focus] = size
        if not latest:
            return Factor(
                fid,
                UNKNOWN,
                sources=tuple(sorted(s.source for s in sizes if s.source)),
                reason=f"no liver tumour size from before the {what} (later sizes may reflect treatment)",
            )
        sizes = list(latest.values())
    largest = max(sizes, key=lambda s: (s.longest_cm, s.date or dt.date.min))
    value = f"{largest.longest_cm:.1f} cm"
    refs = (largest.source,) if largest.source else ()
    if largest.longest_cm > params.largest_lesion_limit_cm:
        return Factor(fid, PRESENT, value, largest.date, refs)
    unmeasured = len(_unmeasured_lesions(facts, tumors, sizes))
    limit = f"{params.largest_lesion_limit_cm:g} cm"
    if "BodyStructure" in facts.unread:
        # Lesions recorded only as Tumor records, and sizes measured on them, are not in the chart:
        # one of them may be larger, or unmeasured (docs/clinical-decisions.md).
        reason = f"the measured liver lesions are ≤ {limit}, but the EHR's Tumor records (BodyStructure) could not be read"
    elif unmeasured:
        reason = f"{unmeasured} liver lesion(s) without a size; the measured ones are ≤ {limit}"
    else:
        return Factor(fid, ABSENT, value, largest.date, refs)
    return Factor(fid, UNKNOWN, value, largest.date, refs, reason=reason)


def recommend(
    *,
    local_therapy_done: bool = False,
    systemic_started: bool = False,
    not_oligometastatic: bool,
    score_min: int,
    score_max: int,
    params: LiverParams,
) -> str:
    """Treatment state first, as on the lung card (docs/service-contract.md): once the liver metastases
    were resected or ablated, advice on what to do before hepatectomy no longer applies; the score
    is then shown for information (an extension value, README). Systemic therapy started for the
    liver metastases makes the question response to it (docs/clinical-rules.md §8.23)."""
    if local_therapy_done:
        return "post-local-therapy-follow-up"
    if systemic_started:
        return "assess-nac-response"
    if not_oligometastatic:
        return "systemic-therapy-first"
    high_from = params.groups["high"][0]
    if score_min >= high_from:
        return "consider-neoadjuvant-chemotherapy"
    if score_max < high_from:
        return "upfront-hepatectomy"
    return "complete-risk-data"


def assess_liver(
    facts: PatientFacts,
    lung: Assessment | None,
    params: LiverParams | None = None,
    today: dt.date | None = None,
) -> LiverAssessment | None:
    """`lung`: the chart's lung assessment, if any; only its oligometastatic verdict is used."""
    params = params or liver_params()
    if not facts.sites("liver"):
        return None
    detected, sources = facts.detected("liver")
    done = tuple(facts.therapies("liver", done=True))
    systemic = tuple(facts.systemic_since("liver"))
    cutoff, what = facts.treatment_cutoff("liver")
    cea = pick_cea(facts.cea, cutoff, what)
    factors: tuple[Factor, ...] = (
        node_positive_primary(facts),
        liver_timing_factor(facts, params),
        lesion_count_factor(facts),
        cea_factor_unchecked(
            cea_factor(cea, "cea_gt_200", params.cea_threshold_ng_ml),
            cea,
            facts,
            "liver",
            params.cea_threshold_ng_ml,
        ),
        lesion_size_factor(facts, params),
    )
    liver_sources = tuple(m.source for m in facts.sites("liver") if m.source)
    factors = cite_assessed(
        factors,
        {
            "node_positive_primary": tuple(facts.primaries),
            "dfi_lt_12m": liver_sources,
            "multiple_liver_metastases": liver_sources,
            "cea_gt_200": liver_sources,
            "largest_liver_metastasis_gt_5cm": liver_sources,
        },
        facts.patient_id,
    )
    score_min, score_max = score_range(factors)
    # Every site outside the liver qualifies the liver-only evidence (§8.7); thoracic sites, as in the
    # lung pathway, do not count towards "not oligometastatic".
    extrahepatic = tuple(sorted({m.organ for m in facts.metastases if m.organ and m.organ != "liver"}))
    others = tuple(
        sorted(
            {
                m.organ
                for m in facts.metastases
                if m.kind == "site" and m.organ and m.organ != "liver" and m.region != "thoracic"
            }
        )
    )
    if lung is not None:
        reasons = lung.reasons_not_oligometastatic  # one verdict for the chart (§8.18)
    else:
        found = []
        if len(others) > params.max_other_organs:
            found.append(f"metastases in {len(others)} organs besides the liver")
        if any(m.organ == "pleura" for m in facts.metastases):
            found.append("pleural dissemination")
        reasons = tuple(found)
    return LiverAssessment(
        factors=factors,
        score_min=score_min,
        score_max=score_max,
        group=group_of(score_min, score_max, params.groups),
        recommendation=recommend(
            local_therapy_done=bool(done),
            systemic_started=bool(systemic),
            not_oligometastatic=bool(reasons),
            score_min=score_min,
            score_max=score_max,
            params=params,
        ),
        cea=cea,
        extrahepatic_organs=extrahepatic,
        reasons_not_oligometastatic=reasons,
        liver_detected=detected,
        liver_sources=tuple(sources),
        lung_involved=bool(facts.sites("lung")),
        local_therapy_done=done,
        systemic=systemic,
        context=context_lines(facts, "liver", today),
    )

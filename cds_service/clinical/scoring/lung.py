"""The four-factor lung model (Cai et al. 2025) and the lung pathway (docs/clinical-rules.md §3, §4).

Pure: PatientFacts in, LungAssessment out.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cds_service.clinical.facts.model import (
    UNREADABLE,
    DatedProcedure,
    Metastasis,
    PatientFacts,
    SystemicTherapy,
)
from cds_service.clinical.knowledge.thresholds import LungParams, group_of, lung_params
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
    disease_free_interval,
    months_between,
    node_positive_primary,
    pick_cea,
    score_range,
)

FACTOR_IDS = ("cea_gt_5", "dfi_lt_24m", "node_positive_primary", "extrapulmonary_metastases")


@dataclass(frozen=True)
class LungAssessment(Assessment):
    extrapulmonary_organs: tuple[str, ...]
    thoracic: tuple[Metastasis, ...]
    lymphangitic: tuple[Metastasis, ...]
    pleural: tuple[Metastasis, ...]
    uncoded_sites: tuple[Metastasis, ...]
    local_therapy_done: tuple[DatedProcedure, ...]
    ablation_planned: tuple[DatedProcedure, ...]
    systemic: tuple[SystemicTherapy, ...]
    lung_detected: dt.date | None
    lung_sources: tuple[str, ...]
    timing: str | None  # synchronous | metachronous | None
    liver_involved: bool
    context: tuple[ContextLine, ...] = ()  # shown, never scored (docs/clinical-rules.md §8.27)


def extrapulmonary_factor(facts: PatientFacts) -> tuple[Factor, tuple[str, ...]]:
    """Metastases outside the chest, by organ; thoracic sites do not count (terminology decisions).

    A recorded history of extrapulmonary metastases counts for the factor (docs/clinical-rules.md §8.29) but
    not among the organs that decide oligometastatic disease, which are the current sites."""
    current = [m for m in facts.metastases if m.region == "extrapulmonary" and m.kind == "site"]
    organs = tuple(sorted({m.organ for m in current if m.organ}))
    sites = current + [m for m in facts.history if m.region == "extrapulmonary"]
    if sites:
        first = min((m.detected for m in sites if m.detected), default=None)
        sources = tuple(sorted({m.source for m in sites if m.source}))
        displays = sorted({m.display for m in sites})
        return Factor("extrapulmonary_metastases", PRESENT, ", ".join(displays), first, sources), organs
    uncoded = [m for m in facts.metastases if m.organ is None]
    if uncoded:
        unreadable = any(m.display == UNREADABLE for m in uncoded)
        return Factor(
            "extrapulmonary_metastases",
            UNKNOWN,
            sources=tuple(m.source for m in uncoded if m.source),
            reason=f"a metastasis Condition {'is not valid FHIR R4' if unreadable else 'has no coded site'}, "
            "so it may lie outside the lung",
        ), ()
    if facts.text_metastases:
        # Recorded only as text (§8.26): it may name a site outside the lung; quoted on the card.
        return Factor(
            "extrapulmonary_metastases",
            UNKNOWN,
            sources=tuple(e.source for e in facts.text_metastases if e.source),
            reason="a chart entry recorded only as text may be a metastasis outside the lung: "
            + quoted([e.text for e in facts.text_metastases]),
        ), ()
    return Factor("extrapulmonary_metastases", ABSENT, "none in the chart"), ()


def timing(facts: PatientFacts, detected: dt.date | None, params: LungParams) -> str | None:
    """Synchronous: lung metastases found within 6 months of the primary diagnosis (Cai 2025)."""
    if detected is None or facts.primary_diagnosis is None:
        return None
    # Partial dates are ranges (§8.25): decided only when every day of them gives the same answer.
    _, detected_last = facts.detected_range("lung")
    diagnosed_last = facts.primary_diagnosis_last or facts.primary_diagnosis
    limit = params.synchronous_within_months
    answers = {
        months_between(facts.primary_diagnosis, detected_last or detected) <= limit,
        months_between(diagnosed_last, detected) <= limit,
    }
    if len(answers) > 1:
        return None
    return "synchronous" if answers.pop() else "metachronous"


def recommend(
    *,
    local_therapy_done: bool,
    not_oligometastatic: bool,
    score_min: int,
    score_max: int,
    ablation_planned: bool = False,
    systemic_started: bool = False,
) -> str:
    """The lung pathway table (docs/clinical-rules.md §4; docs/service-contract.md, first match wins):
    treatment states first, then the four-factor pathway."""
    if local_therapy_done:
        return "post-local-therapy-follow-up"
    if ablation_planned:
        return "ablation-guidance"
    if systemic_started:
        return "assess-nat-response"
    if not_oligometastatic:
        return "systemic-therapy-first"
    if score_min >= 1:
        return "consider-nat"
    if score_max == 0:
        return "upfront-local-therapy"
    return "complete-risk-data"


def assess_lung(
    facts: PatientFacts, params: LungParams | None = None, today: dt.date | None = None
) -> LungAssessment | None:
    """The lung card's assessment; None when the chart has no lung metastasis. `today` dates the
    patient's age for the context lines (none without it)."""
    params = params or lung_params()
    if not facts.sites("lung"):
        return None
    detected, lung_sources = facts.detected("lung")
    done = tuple(facts.therapies("lung", done=True))
    planned = tuple(t for t in facts.therapies("lung", done=False) if t.kind in ("ablation", "sbrt"))
    systemic = tuple(facts.systemic_since("lung"))
    cutoff, what = facts.treatment_cutoff("lung")
    cea = pick_cea(facts.cea, cutoff, what)
    extrapulmonary, organs = extrapulmonary_factor(facts)
    factors: tuple[Factor, ...] = (
        cea_factor_unchecked(
            cea_factor(cea, "cea_gt_5", params.cea_threshold_ng_ml),
            cea,
            facts,
            "lung",
            params.cea_threshold_ng_ml,
        ),
        disease_free_interval(facts, "lung", "dfi_lt_24m", params.dfi_limit_months),
        node_positive_primary(facts),
        extrapulmonary,
    )
    metastases = tuple(sorted({m.source for m in facts.metastases if m.source}))
    factors = cite_assessed(
        factors,
        {
            "cea_gt_5": tuple(lung_sources),
            "dfi_lt_24m": tuple(lung_sources),
            "node_positive_primary": tuple(facts.primaries),
            "extrapulmonary_metastases": metastases,
        },
        facts.patient_id,
    )
    score_min, score_max = score_range(factors)

    lymphangitic = tuple(m for m in facts.metastases if m.kind == "lymphangitic")
    pleural = tuple(m for m in facts.metastases if m.organ == "pleura")
    reasons = []
    if len(organs) > params.max_extrapulmonary_organs:
        reasons.append(f"metastases in {len(organs)} organs outside the lung")
    if lymphangitic:
        reasons.append("lymphangitic carcinomatosis")
    if pleural:
        reasons.append("pleural dissemination")

    return LungAssessment(
        factors=factors,
        score_min=score_min,
        score_max=score_max,
        group=group_of(score_min, score_max, params.groups),
        recommendation=recommend(
            local_therapy_done=bool(done),
            not_oligometastatic=bool(reasons),
            score_min=score_min,
            score_max=score_max,
            ablation_planned=bool(planned),
            systemic_started=bool(systemic),
        ),
        cea=cea,
        extrapulmonary_organs=organs,
        thoracic=tuple(m for m in facts.metastases if m.region == "thoracic" and m.organ != "pleura"),
        lymphangitic=lymphangitic,
        pleural=pleural,
        uncoded_sites=tuple(m for m in facts.metastases if m.organ is None),
        local_therapy_done=done,
        ablation_planned=planned,
        systemic=systemic,
        lung_detected=detected,
        lung_sources=tuple(lung_sources),
        timing=timing(facts, detected, params),
        liver_involved=bool(facts.sites("liver")),
        reasons_not_oligometastatic=tuple(reasons),
        context=context_lines(facts, "lung", today),
    )

"""Assessment → the view a card template reads (`a` in cards/*.md.j2).

Chart-derived text is Markdown-escaped here, once, before it reaches a template, so a hostile chart
cannot inject links or HTML into the EHR.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cds_service.clinical.facts.model import UNREADABLE, DatedProcedure, PatientFacts
from cds_service.clinical.knowledge.terminology import terminology
from cds_service.clinical.knowledge.thresholds import group_of, lung_params
from cds_service.clinical.scoring.factors import UNKNOWN, Assessment, Factor
from cds_service.clinical.scoring.liver import LiverAssessment
from cds_service.clinical.scoring.lung import LungAssessment
from cds_service.render.markdown import md


@dataclass(frozen=True)
class FactorView:
    id: str
    label: str
    status: str
    value_or_reason: str
    date: str
    sources: str
    reason: str


def _factor_view(f: Factor, label: str) -> FactorView:
    shown = f"*unknown: {md(f.reason or 'not in the chart')}*" if f.status == UNKNOWN else md(f.value or "")
    return FactorView(
        id=f.id,
        label=label,
        status=f.status,
        value_or_reason=shown or "—",
        date=f.date.isoformat() if f.date else "—",
        sources=", ".join(md(s) for s in f.sources) or "—",
        reason=md(f.reason or ""),
    )


def _score_text(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}–{hi}"


def common_view(
    a: Assessment, facts: PatientFacts, spec: dict, today: dt.date, max_age: int
) -> dict[str, Any]:
    """What both cards show: the factor table, the CEA rule and what was not used."""
    cea, labels, reasons_not_oligo = a.cea, spec["factor_labels"], a.reasons_not_oligometastatic
    result = cea.result
    age = (today - result.date).days if result and result.date else None
    lo, hi = a.score_min, a.score_max
    return {
        "factors": [_factor_view(f, labels[f.id]) for f in a.factors],
        "unknown_factors": [_factor_view(f, labels[f.id]) for f in a.unknown],
        "score_min": lo,
        "score_max": hi,
        "score_text": _score_text(lo, hi),
        "group": a.group,
        "recommendation": a.recommendation,
        "cea_rule": (
            f"{md(cea.rule)} ({md(result.shown)}, {result.date.isoformat()})"
            if result and result.date
            else f"none ({md(cea.reason or 'no CEA')})"
        ),
        "cea_stale": bool(cea.picked_latest and age is not None and age > max_age),
        "cea_age_days": age,
        "cea_max_age_days": max_age,
        "cea_not_used": [
            f"{md(r.shown)}{' of ' + r.date.isoformat() if r.date else ''} ({md(r.unreadable or '')})"
            for r in cea.not_used
        ],
        "skipped": ", ".join(md(s) for s in facts.skipped),
        "not_oligo_short": reasons_not_oligo[0] if reasons_not_oligo else "",
        "not_oligo_long": "; ".join(reasons_not_oligo),
        "mdt_line": spec["mdt_line"],
    }


def lung_view(a: LungAssessment, facts: PatientFacts, spec: dict, today: dt.date, max_age: int) -> dict:
    groups = lung_params().groups
    view = common_view(a, facts, spec, today, max_age)
    at_min, at_max = group_of(a.score_min, a.score_min, groups), group_of(a.score_max, a.score_max, groups)
    view.update(
        {
            "group_text": a.group if a.group != "undetermined" else f"{at_min}-to-{at_max}",
            "group_at_min": at_min,
            "group_at_max": at_max,
            "lung_detected": a.lung_detected.isoformat() if a.lung_detected else None,
            "timing": a.timing,
            "extrapulmonary_organs": ", ".join(_organ_display(o) for o in a.extrapulmonary_organs),
            # Seed 003 applies its lung-and-liver staging to one extrapulmonary site other than liver.
            "staged_site": (
                _organ_display(a.extrapulmonary_organs[0])
                if not a.liver_involved and len(a.extrapulmonary_organs) == 1
                else None
            ),
            "thoracic": [f"{md(m.display)} ({md(m.source or 'no id')})" for m in a.thoracic],
            # Unreadable ones are listed with the other skipped resources.
            "uncoded": [
                md(m.source or "a Condition without id") for m in a.uncoded_sites if m.display != UNREADABLE
            ],
            "local_therapy": _procedures_text(a.local_therapy_done),
            "liver_involved": a.liver_involved,
            "systemic": "; ".join(
                f"{md(t.drug)} from {t.start.isoformat() if t.start else '(no date)'} ({md(t.source or 'no id')}; "
                f"matched by {t.matched_by})"
                for t in a.systemic
            ),
            "systemic_start": min((t.start for t in a.systemic if t.start), default=dt.date.min).isoformat(),
            "planned": "; ".join(
                f"{md(t.display)}{' ' + t.date.isoformat() if t.date else ''} ({md(t.source or 'no id')})"
                for t in a.ablation_planned
            ),
            "planned_kind": "SBRT"
            if a.ablation_planned and all(t.kind == "sbrt" for t in a.ablation_planned)
            else "ablation",
            "lung_lesion_size": _lung_lesion_size(facts),
        }
    )
    return view


def _procedures_text(procedures: Iterable[DatedProcedure]) -> str:
    return "; ".join(
        f"{md(t.display)} {t.date.isoformat() if t.date else '(no date)'} ({md(t.source or 'no id')})"
        for t in procedures
    )


def _lung_lesion_size(facts: PatientFacts) -> str:
    """The largest lung lesion recorded (TumorSize focused on a lung Tumor or lung-metastasis Condition)."""
    lung_refs = {m.source for m in facts.sites("lung") if m.source}
    lung_refs |= {t.source for t in facts.tumors if t.organ == "lung"}
    sizes = [s for s in facts.tumor_sizes if s.focus & lung_refs]
    if not sizes:
        return ""
    largest = max(sizes, key=lambda s: s.longest_cm)
    limit = lung_params().ablation_lesion_risk_cm
    flag = f" (≥ {limit:g} cm: higher local progression risk)" if largest.longest_cm >= limit else ""
    return f"{largest.longest_cm:.1f} cm ({md(largest.source or 'no id')}){flag}"


def liver_view(a: LiverAssessment, facts: PatientFacts, spec: dict, today: dt.date, max_age: int) -> dict:
    view = common_view(a, facts, spec, today, max_age)
    view.update(
        {
            "liver_detected": a.liver_detected.isoformat() if a.liver_detected else None,
            "extrahepatic": ", ".join(_organ_display(o) for o in a.extrahepatic_organs),
            "lung_involved": a.lung_involved,
            "systemic": "; ".join(
                f"{md(t.drug)} from {t.start.isoformat() if t.start else '(no date)'} ({md(t.source or 'no id')})"
                for t in facts.systemic_since("liver")
            ),
            "systemic_start": min((t.start for t in a.systemic if t.start), default=dt.date.min).isoformat(),
            "local_therapy": _procedures_text(a.local_therapy_done),
        }
    )
    return view


def _organ_display(organ: str) -> str:
    site = terminology().sites.get(organ)
    return site.display if site else organ

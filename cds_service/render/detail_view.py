"""Assessment → the view a card template reads (`a` in cards/*.md.j2).

Chart-derived text is Markdown-escaped here, once, before it reaches a template, so a hostile chart
cannot inject links or HTML into the EHR.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cds_service.clinical.facts.model import UNREADABLE, DatedProcedure, PatientFacts
from cds_service.clinical.knowledge.terminology import terminology
from cds_service.clinical.knowledge.thresholds import group_of, lung_params
from cds_service.clinical.scoring.factors import ABSENT, PRESENT, UNKNOWN, Assessment, Factor
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


# SNOMED CT fully specified names end with a semantic tag, "(disorder)", "(qualifier value)": the FHIR
# display should not carry it, but charts do; on a card it only nests parentheses.
_SEMANTIC_TAG = re.compile(
    r"\s*\((?:qualifier value|disorder|finding|procedure|morphologic abnormality|body structure|"
    r"observable entity|regime/therapy|situation|tumor staging|staging scale)\)",
    re.IGNORECASE,
)
NB_HYPHEN = "\u2011"  # a hyphen a line never breaks at: dates stay whole in a narrow side panel


ZWSP = "\u200b"  # a zero-width space: a place a line may break, invisible on the card
_LONG_RUN = 16  # characters of an id without a break opportunity, at most (about 120 px)
_BREAKS = re.compile(r"([-/\s])")  # a line may break at these (UAX #14), within ids too
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,39}")  # a FHIR resource type name


def ref(source: str) -> str:
    """A FHIR reference on a card, as inert Markdown that fits a narrow side panel.

    An EHR's ids can be 40+ characters without a hyphen (Epic's `eXbT1.kQ2…`); an EHR renders the
    factor table at its content's width, so one such id widened the table past the panel, where it
    was cut off. So a line may break after each `/` and every 16 characters of a longer run (a
    zero-width space: nothing is shown). The assessment extension keeps every reference exact.
    """
    pieces: list[str] = []
    parts = _BREAKS.split(" ".join(source.split()))
    for i, part in enumerate(parts):
        if part in ("-", " "):
            pieces.append(part)
        elif part == "/":
            pieces.append("/" + ZWSP)
        elif i + 1 < len(parts) and parts[i + 1] == "/" and _TYPE.fullmatch(part):
            pieces.append(part)  # a resource type (MedicationAdministration: 24 letters) stays whole
        else:
            chunks = [part[k : k + _LONG_RUN] for k in range(0, len(part), _LONG_RUN)]
            pieces.append(ZWSP.join(md(c) for c in chunks))
    return "".join(pieces)


def day(date: dt.date | None) -> str:
    """A date as the card shows it: ISO 8601 with non-breaking hyphens."""
    return date.isoformat().replace("-", NB_HYPHEN) if date else "—"


_ISO_DAY = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")


_ONE_OF = re.compile(r"\b1 (\w+ )?(\w+)\(s\)")  # "1 liver lesion(s)" → "1 liver lesion"
_SOME_OF = re.compile(r"(\w)\(s\)")  # "2 liver lesion(s)" → "2 liver lesions"


_MAX_CHART_TEXT = 120  # characters of one chart text on a card; the chart itself has the rest


def clean(text: str) -> str:
    """Chart text for a card: semantic tags dropped, plurals written out, at most 120 characters,
    made inert Markdown, dates kept whole."""
    if len(text) > _MAX_CHART_TEXT:
        text = text[: _MAX_CHART_TEXT - 1] + "…"
    text = _SOME_OF.sub(r"\1s", _ONE_OF.sub(r"1 \1\2", _SEMANTIC_TAG.sub("", text)))
    return _ISO_DAY.sub(f"\\1{NB_HYPHEN}\\2{NB_HYPHEN}\\3", md(text))


def _factor_view(f: Factor, label: str) -> FactorView:
    shown = f"*{clean(f.reason or 'not in the chart')}*" if f.status == UNKNOWN else clean(f.value or "")
    return FactorView(
        id=f.id,
        label=label,
        status=f.status,
        value_or_reason=shown or "—",
        date=day(f.date),
        sources=", ".join(ref(s) for s in f.sources),
        reason=clean(f.reason or ""),
    )


def _score_text(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}–{hi}"


def common_view(
    a: Assessment, facts: PatientFacts, spec: dict, today: dt.date, max_age: int
) -> dict[str, Any]:
    """What both cards show: the factor table, the CEA used and what was not used."""
    cea, labels, reasons_not_oligo = a.cea, spec["factor_labels"], a.reasons_not_oligometastatic
    result = cea.result
    age = (today - result.date).days if result and result.date else None
    lo, hi = a.score_min, a.score_max
    notes = [
        f"CEA {md(r.shown)}{' of ' + day(r.date) if r.date else ''} not used ({md(r.unreadable or '')})"
        for r in cea.not_used
    ]
    if facts.skipped:
        notes.append("not read, not valid FHIR: " + ", ".join(ref(s) for s in facts.skipped))
    return {
        "factors": [_factor_view(f, labels[f.id]) for f in a.factors],
        "unknown_factors": [_factor_view(f, labels[f.id]) for f in a.unknown],
        "unknown_labels": ", ".join(labels[f.id] for f in a.unknown),
        "score_min": lo,
        "score_max": hi,
        "score_text": _score_text(lo, hi),
        "group": a.group,
        "recommendation": a.recommendation,
        # The rule that picked the CEA, shown under the table; nothing when no CEA was picked.
        "cea_rule": clean(cea.rule) if result is not None else "",
        "cea_stale": bool(cea.picked_latest and age is not None and age > max_age),
        "cea_age_days": age,
        "cea_max_age_days": max_age,
        "chart_notes": "; ".join(notes),
        "not_oligo": "; ".join(md(r) for r in reasons_not_oligo),
        "not_oligo_short": reasons_not_oligo[0] if reasons_not_oligo else "",
        "mdt_line": spec["mdt_line"],
        "compact": False,  # set when the card must shed its supporting evidence to stay short
        "context": _context_lines(getattr(a, "context", ())),
    }


def _context_lines(lines: Iterable[Any]) -> list[str]:
    """Context lines (docs/clinical-rules.md §8.27) with their sources; chart text escaped like all chart text.
    cards._card leaves the last ones out when the card would be too long."""
    return [
        f"{md(c.value)}{' (' + ', '.join(ref(s) for s in c.sources) + ')' if c.sources else ''}"
        for c in lines
        if c.id != "thoracic-nodes"  # the card has its own line for them, with the evidence
    ]


def lung_view(a: LungAssessment, facts: PatientFacts, spec: dict, today: dt.date, max_age: int) -> dict:
    groups = lung_params().groups
    view = common_view(a, facts, spec, today, max_age)
    at_min, at_max = group_of(a.score_min, a.score_min, groups), group_of(a.score_max, a.score_max, groups)
    organs = a.extrapulmonary_organs
    extrapulmonary = next(f for f in a.factors if f.id == "extrapulmonary_metastases")
    dfi = next(f for f in a.factors if f.id == "dfi_lt_24m")
    oligometastatic = not a.reasons_not_oligometastatic
    view.update(
        {
            "group_text": a.group if a.group != "undetermined" else f"{at_min} to {at_max}",
            "group_at_min": at_min,
            "group_at_max": at_max,
            "timing": a.timing,
            # Isolated (the Li 2019 consensus): no metastatic organ but the lung, as far as the chart can tell.
            "isolated": extrapulmonary.status == ABSENT and oligometastatic,
            "dfi_zero": dfi.status == PRESENT and (dfi.value or "").startswith("0 months"),
            "many_organs": len(organs) > lung_params().max_extrapulmonary_organs,
            "lymphangitic": bool(a.lymphangitic),
            "pleural": bool(a.pleural),
            # The Li 2019 consensus, Table 4: lung and liver, or lung and one other organ, when oligometastatic.
            "staged_site": _organ_display(organs[0]) if oligometastatic and len(organs) == 1 else None,
            "staged_liver": organs == ("liver",),
            "thoracic": ", ".join(f"{clean(m.display)} ({ref(m.source or 'no id')})" for m in a.thoracic),
            # Unreadable ones are listed with the other skipped resources.
            "uncoded": ", ".join(
                ref(m.source or "a Condition without id") for m in a.uncoded_sites if m.display != UNREADABLE
            ),
            "local_therapy": _procedures_text(a.local_therapy_done),
            "liver_involved": a.liver_involved,
            "systemic": "; ".join(
                f"{clean(t.drug)} from {day(t.start) if t.start else '(no date)'} ({ref(t.source or 'no id')})"
                for t in a.systemic
            ),
            "systemic_start": min((t.start for t in a.systemic if t.start), default=dt.date.min).isoformat(),
            "systemic_start_day": day(min((t.start for t in a.systemic if t.start), default=None)),
            "planned": "; ".join(
                f"{clean(t.display)}{' ' + day(t.date) if t.date else ''} ({ref(t.source or 'no id')})"
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
        f"{clean(t.display)} {day(t.date) if t.date else '(no date)'} ({ref(t.source or 'no id')})"
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
    return f"{largest.longest_cm:.1f} cm ({ref(largest.source or 'no id')}){flag}"


def liver_view(a: LiverAssessment, facts: PatientFacts, spec: dict, today: dt.date, max_age: int) -> dict:
    view = common_view(a, facts, spec, today, max_age)
    view.update(
        {
            "extrahepatic": ", ".join(_organ_display(o) for o in a.extrahepatic_organs),
            "lung_involved": a.lung_involved,
            "systemic": "; ".join(
                f"{clean(t.drug)} from {day(t.start) if t.start else '(no date)'} ({ref(t.source or 'no id')})"
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

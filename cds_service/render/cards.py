"""Assessments → CDS Hooks cards, through the templates and evidence of cards/.

The only module that knows the card JSON. Chart-derived text is Markdown-escaped here, once,
before it reaches a template, so a hostile chart cannot inject links or HTML into the EHR.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2
import yaml

from cds_service.clinical.facts.derive import UNREADABLE, DatedProcedure, PatientFacts
from cds_service.clinical.knowledge.terminology import terminology
from cds_service.clinical.knowledge.thresholds import group_of, lung_params
from cds_service.clinical.scoring.factors import UNKNOWN, Assessment, CeaPick, Factor
from cds_service.clinical.scoring.liver import LiverAssessment
from cds_service.clinical.scoring.lung import LungAssessment
from cds_service.hooks.models import Action, Card, Coding, Link, Source, Suggestion
from cds_service.jsonio import dumps
from cds_service.paths import data_dir

# Card and suggestion uuids are derived (uuid5) from hookInstance and content: a retried call gets
# the same uuids, and feedback traces back to the call that produced the card.
_UUID_NAMESPACE = uuid.UUID("6f1c1d0e-8a0b-5d53-9a43-6d2f0c3a7e11")
TOPIC_SYSTEM = "urn:crc-cds:card-topic"
OVERRIDE_SYSTEM = "urn:crc-cds:override-reason"
ASSESSMENT_KEY = "crc-cds-assessment"

# Each Markdown-special character gets a backslash; one C-level pass (str.translate), not a regex.
_MD_ESCAPES = str.maketrans({c: "\\" + c for c in "\\`*_{}[]<>#!|~&:"})


def md(text: Any) -> str:
    """Chart text made inert in Markdown: no links, HTML, emphasis or table breaks."""
    flat = " ".join(str(text).split())
    return flat.translate(_MD_ESCAPES).replace("www.", "www\\.")


# The names a plain dict answers as attributes (its methods and dunders): only these shadow its keys.
_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Environment(jinja2.Environment):
    """Jinja with a fast path for the plain dicts the templates read (`a.group`, `ev.li2019.label`).

    Jinja's `x.name` tries the attribute first and the item second, so every dict lookup raised and
    caught an AttributeError. A plain dict has no attributes but dict's own, so reading the item
    directly when `name` is not one of those gives the same value, without the exception.
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


@cache
def _environment() -> jinja2.Environment:
    return _Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("cards"))),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML: chart text is escaped by md() before it gets here
        trim_blocks=True,
        lstrip_blocks=True,
    )


@cache
def _yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((data_dir("cards") / name).read_text(encoding="utf-8"))


def evidence() -> dict[str, Any]:
    return _yaml("evidence.yaml")["papers"]


@cache
def _detail_template(name: str) -> jinja2.Template:
    # Compiled once, like the YAML specs: no per-call loader lookup and template file stat.
    return _environment().get_template(name)


@cache
def _summary_template(spec_file: str, recommendation: str) -> jinja2.Template:
    return _environment().from_string(_yaml(spec_file)["recommendations"][recommendation]["summary"])


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


def _common_view(
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


def _lung_view(a: LungAssessment, facts: PatientFacts, spec: dict, today: dt.date, max_age: int) -> dict:
    groups = lung_params().groups
    view = _common_view(a, facts, spec, today, max_age)
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
    flag = " (≥ 3 cm: higher local progression risk)" if largest.longest_cm >= 3 else ""
    return f"{largest.longest_cm:.1f} cm ({md(largest.source or 'no id')}){flag}"


def _liver_view(a: LiverAssessment, facts: PatientFacts, spec: dict, today: dt.date, max_age: int) -> dict:
    view = _common_view(a, facts, spec, today, max_age)
    view.update(
        {
            "liver_detected": a.liver_detected.isoformat() if a.liver_detected else None,
            "extrahepatic": ", ".join(_organ_display(o) for o in a.extrahepatic_organs),
            "lung_involved": a.lung_involved,
            "systemic": "; ".join(
                f"{md(t.drug)} from {t.start.isoformat() if t.start else '(no date)'} ({md(t.source or 'no id')})"
                for t in facts.systemic_since("liver")
            ),
            "local_therapy": _procedures_text(a.local_therapy_done),
        }
    )
    return view


def _service_request(patient_id: str, code: dict[str, Any], reasons: list[str], note: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "proposal",
        "code": code,
        "subject": {"reference": f"Patient/{patient_id}"},
        "reasonReference": [{"reference": r} for r in reasons],
        "note": [{"text": note}],
    }
    # No requester: the EHR fills it with the user who accepts the suggestion; putting the context
    # user here would also make the same chart give different cards for different users.
    return resource


# Same as \n{3,}, but its literal prefix lets the regex engine skip ahead: ~10x faster on a card.
_BLANK_LINES = re.compile(r"\n\n\n+")


def _organ_display(organ: str) -> str:
    site = terminology().sites.get(organ)
    return site.display if site else organ


def _tidy(markdown: str) -> str:
    """Collapse the blank lines left by optional template sections (never more than one)."""
    return _BLANK_LINES.sub("\n\n", markdown).strip() + "\n"


def _derived_uuid(*parts: str) -> str:
    """uuid5 of the parts. Written out (not uuid.uuid5) so that chart text holding a lone UTF-16
    surrogate, which JSON allows as a \\u escape, still hashes instead of failing to encode."""
    digest = hashlib.sha1(_UUID_NAMESPACE.bytes + "|".join(parts).encode("utf-8", "surrogatepass")).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


def _assessment_json(model: str, a: Assessment) -> dict[str, Any]:
    """The `crc-cds-assessment` extension (service contract §4)."""
    return {
        "model": model,
        "recommendation": a.recommendation,
        "score": {"min": a.score_min, "max": a.score_max},
        "group": a.group,
        "factors": [f.assessment() for f in a.factors],
        "cea_rule": a.cea.rule,
    }


def _card(
    spec_file: str,
    template: str,
    view: dict[str, Any],
    assessment: dict[str, Any],
    facts: PatientFacts,
    reasons: list[str],
    suggest_cea: bool,
    hook_instance: str,
) -> Card:
    spec, papers = _yaml(spec_file), evidence()
    recommendation = assessment["recommendation"]
    rec = spec["recommendations"][recommendation]
    paper = papers[spec["source_paper"]]
    card = Card(
        summary=_summary_template(spec_file, recommendation).render(a=view),
        detail=_tidy(_detail_template(template).render(a=view, ev=papers)),
        indicator=rec["indicator"],
        source=Source(
            label=paper["label"],
            url=paper["url"],
            topic=Coding(system=TOPIC_SYSTEM, code=spec["topic"]["code"], display=spec["topic"]["display"]),
        ),
        links=[Link(label=papers[p]["label"], url=papers[p]["url"], type="absolute") for p in spec["links"]],
        overrideReasons=[
            Coding(system=OVERRIDE_SYSTEM, code=r["code"], display=r["display"])
            for r in spec["override_reasons"]
        ],
        extension={ASSESSMENT_KEY: assessment},
    )
    # What makes this card this card: its words and its assessment (source, links and override
    # reasons follow from the card spec and the recommendation, both named).
    content = dumps([spec_file, card.indicator, card.summary, card.detail, assessment], sort_keys=True)
    card.uuid = _derived_uuid(hook_instance, content)
    wanted = ["mdt", "cea"] if suggest_cea else ["mdt"]
    card.suggestions = [
        Suggestion(
            label=s["label"],
            uuid=_derived_uuid(card.uuid, key),
            actions=[
                Action(
                    type="create",
                    description=s["description"],
                    resource=_service_request(facts.patient_id, s["code"], reasons, s["code"]["text"]),
                )
            ],
        )
        for key in wanted
        for s in [spec["suggestions"][key]]
    ]
    card.selectionBehavior = "any"
    return card


def _needs_cea(cea: CeaPick, factor: Factor, stale: bool) -> bool:
    # A new CEA helps only when the rule may use the latest result (no local therapy yet).
    return stale or (factor.status == UNKNOWN and cea.result is None and cea.picked_latest)


# Each card: its spec (wording, links, override reasons) and its detail template, in cards/.
_LUNG = ("lung.yaml", "lung_detail.md.j2")
_LIVER = ("liver.yaml", "liver_detail.md.j2")


def preload() -> None:
    """Read every card spec and compile every template now rather than on a first call."""
    evidence()
    for spec_file, template in (_LUNG, _LIVER):
        _detail_template(template)
        for recommendation in _yaml(spec_file)["recommendations"]:
            _summary_template(spec_file, recommendation)


def lung_card(
    a: LungAssessment,
    facts: PatientFacts,
    *,
    hook_instance: str,
    today: dt.date,
    cea_max_age_days: int,
) -> Card:
    spec = _yaml(_LUNG[0])
    view = _lung_view(a, facts, spec, today, cea_max_age_days)
    assessment = _assessment_json(spec["model"], a)
    return _card(
        *_LUNG,
        view,
        assessment,
        facts,
        list(a.lung_sources),
        _needs_cea(a.cea, a.factors[0], view["cea_stale"]),
        hook_instance,
    )


def liver_card(
    a: LiverAssessment,
    facts: PatientFacts,
    *,
    hook_instance: str,
    today: dt.date,
    cea_max_age_days: int,
) -> Card:
    spec = _yaml(_LIVER[0])
    view = _liver_view(a, facts, spec, today, cea_max_age_days)
    assessment = _assessment_json(spec["model"], a)
    cea_factor = next(f for f in a.factors if f.id == "cea_gt_200")
    return _card(
        *_LIVER,
        view,
        assessment,
        facts,
        list(a.liver_sources),
        _needs_cea(a.cea, cea_factor, view["cea_stale"]),
        hook_instance,
    )

"""Assessments → CDS Hooks cards, through the templates and evidence of cards/.

The only module that knows the card JSON. Chart-derived text is Markdown-escaped here, once,
before it reaches a template, so a hostile chart cannot inject links or HTML into the EHR.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2
import yaml

from .factors import UNKNOWN, Factor
from .facts import PatientFacts
from .lung import LungAssessment
from .models import group_of, lung_params
from .paths import data_dir
from .protocol import Action, Card, Coding, Link, Source, Suggestion

# Card and suggestion uuids are derived (uuid5) from hookInstance and content: a retried call gets
# the same uuids, and feedback traces back to the call that produced the card.
_UUID_NAMESPACE = uuid.UUID("6f1c1d0e-8a0b-5d53-9a43-6d2f0c3a7e11")
TOPIC_SYSTEM = "urn:crc-cds:card-topic"
OVERRIDE_SYSTEM = "urn:crc-cds:override-reason"
ASSESSMENT_KEY = "crc-cds-assessment"

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#!|~&:])")


def md(text: Any) -> str:
    """Chart text made inert in Markdown: no links, HTML, emphasis or table breaks."""
    flat = " ".join(str(text).split())
    return _MD_SPECIAL.sub(r"\\\1", flat).replace("www.", "www\\.")


@cache
def _catalogue() -> tuple[dict[str, Any], dict[str, Any], jinja2.Environment]:
    folder = data_dir("cards")
    evidence = yaml.safe_load((folder / "evidence.yaml").read_text(encoding="utf-8"))["papers"]
    lung = yaml.safe_load((folder / "lung.yaml").read_text(encoding="utf-8"))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML: chart text is escaped by md() before it gets here
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    return evidence, lung, env


@cache
def _summary_template(recommendation: str) -> jinja2.Template:
    _, spec, env = _catalogue()
    return env.from_string(spec["recommendations"][recommendation]["summary"])


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
    if f.status == UNKNOWN:
        shown = f"*unknown: {md(f.reason or 'not in the chart')}*"
    else:
        shown = md(f.value or "")
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


def _group_text(a: LungAssessment) -> str:
    if a.group != "undetermined":
        return a.group
    groups = lung_params().groups
    return f"{group_of(a.score_min, a.score_min, groups)}-to-{group_of(a.score_max, a.score_max, groups)}"


def _lung_view(
    a: LungAssessment,
    facts: PatientFacts,
    labels: dict[str, str],
    today: dt.date,
    max_age: int,
    mdt_line: str,
) -> dict[str, Any]:
    groups = lung_params().groups
    cea = a.cea.result
    age = (today - cea.date).days if cea and cea.date else None
    stale = bool(a.cea.picked_latest and age is not None and age > max_age)
    not_oligo = list(a.reasons_not_oligometastatic)
    return {
        "factors": [_factor_view(f, labels[f.id]) for f in a.factors],
        "unknown_factors": [_factor_view(f, labels[f.id]) for f in a.unknown],
        "score_min": a.score_min,
        "score_max": a.score_max,
        "score_text": _score_text(a.score_min, a.score_max),
        "group": a.group,
        "group_text": _group_text(a),
        "group_at_min": group_of(a.score_min, a.score_min, groups),
        "group_at_max": group_of(a.score_max, a.score_max, groups),
        "recommendation": a.recommendation,
        "cea_rule": md(a.cea.rule)
        + (f" ({md(cea.shown)}, {cea.date.isoformat()})" if cea and cea.date else ""),
        "cea_stale": stale,
        "cea_age_days": age,
        "cea_max_age_days": max_age,
        "cea_not_used": [
            f"{md(r.shown)}{' of ' + r.date.isoformat() if r.date else ''} ({md(r.unreadable or '')})"
            for r in a.cea.not_used
        ],
        "lung_detected": a.lung_detected.isoformat() if a.lung_detected else None,
        "timing": a.timing,
        "extrapulmonary_organs": ", ".join(a.extrapulmonary_organs),
        "thoracic": [f"{md(m.display)} ({md(m.source or 'no id')})" for m in a.thoracic],
        "uncoded": [md(m.source or "a Condition without id") for m in a.uncoded_sites],
        "skipped": ", ".join(md(s) for s in facts.skipped),
        "not_oligo_short": not_oligo[0] if not_oligo else "",
        "not_oligo_long": "; ".join(not_oligo),
        "local_therapy": "; ".join(
            f"{md(t.display)} {t.date.isoformat() if t.date else '(no date)'} ({md(t.source or 'no id')})"
            for t in a.local_therapy_done
        ),
        "liver_involved": a.liver_involved,
        "mdt_line": mdt_line,
    }


def _service_request(
    patient_id: str, code: dict[str, Any], reasons: list[str], user_id: str | None, note: str
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "proposal",
        "code": code,
        "subject": {"reference": f"Patient/{patient_id}"},
        "reasonReference": [{"reference": r} for r in reasons],
        "note": [{"text": note}],
    }
    if user_id and "/" in user_id:
        resource["requester"] = {"reference": user_id}
    return resource


def _tidy(markdown: str) -> str:
    """Collapse the blank lines left by optional template sections (never more than one)."""
    return re.sub(r"\n{3,}", "\n\n", markdown).strip() + "\n"


def _derived_uuid(*parts: str) -> str:
    return str(uuid.uuid5(_UUID_NAMESPACE, "|".join(parts)))


def lung_card(
    a: LungAssessment,
    facts: PatientFacts,
    *,
    hook_instance: str,
    user_id: str | None,
    today: dt.date,
    cea_max_age_days: int,
) -> Card:
    evidence, spec, env = _catalogue()
    labels = spec["factor_labels"]
    view = _lung_view(a, facts, labels, today, cea_max_age_days, spec["mdt_line"])
    rec = spec["recommendations"][a.recommendation]
    summary = _summary_template(a.recommendation).render(a=view)
    detail = _tidy(env.get_template("lung_detail.md.j2").render(a=view, ev=evidence))

    reasons = list(a.lung_sources)
    suggestions = []
    mdt = spec["suggestions"]["mdt"]
    suggestions.append(("mdt", mdt, reasons))
    cea_missing = a.factors[0].status == UNKNOWN and a.cea.result is None and a.cea.picked_latest
    if cea_missing or view["cea_stale"]:
        suggestions.append(("cea", spec["suggestions"]["cea"], reasons))

    paper = evidence[spec["source_paper"]]
    card = Card(
        summary=summary,
        detail=detail,
        indicator=rec["indicator"],
        source=Source(
            label=paper["label"],
            url=paper["url"],
            topic=Coding(system=TOPIC_SYSTEM, code=spec["topic"]["code"], display=spec["topic"]["display"]),
        ),
        links=[
            Link(label=evidence[p]["label"], url=evidence[p]["url"], type="absolute") for p in spec["links"]
        ],
        overrideReasons=[
            Coding(system=OVERRIDE_SYSTEM, code=r["code"], display=r["display"])
            for r in spec["override_reasons"]
        ],
        extension={ASSESSMENT_KEY: lung_assessment_json(a, spec["model"])},
    )
    content = json.dumps(card.model_dump(mode="json", exclude_none=True), sort_keys=True)
    card.uuid = _derived_uuid(hook_instance, content)
    card.suggestions = [
        Suggestion(
            label=s["label"],
            uuid=_derived_uuid(card.uuid, key),
            actions=[
                Action(
                    type="create",
                    description=s["description"],
                    resource=_service_request(facts.patient_id, s["code"], refs, user_id, s["code"]["text"]),
                )
            ],
        )
        for key, s, refs in suggestions
    ]
    card.selectionBehavior = "any"
    return card


def lung_assessment_json(a: LungAssessment, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "recommendation": a.recommendation,
        "score": {"min": a.score_min, "max": a.score_max},
        "group": a.group,
        "factors": [f.assessment() for f in a.factors],
        "cea_rule": a.cea.rule,
    }

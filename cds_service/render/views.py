"""Card JSON → what an HTML page shows of it (the preview page's card views).

Render is the only package that knows the card JSON, so reading it back lives here too: a page gets
plain dataclasses whose strings are text, and a card's detail as safe HTML (render_markdown).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import yaml
from markupsafe import Markup

from cds_service.paths import data_dir
from cds_service.render.cards import ASSESSMENT_KEY
from cds_service.render.markdown import render_markdown

_INDICATORS = frozenset({"info", "warning", "critical"})
_STATUSES = frozenset({"present", "absent", "unknown"})


@dataclass(frozen=True)
class LinkView:
    label: str
    url: str | None  # None when not http(s): shown as text, never as a link

    @property
    def evidence_page(self) -> bool:  # the service's own page for the card's model
        return self.url is not None and "/evidence/" in urlsplit(self.url).path


@dataclass(frozen=True)
class SuggestionView:
    uuid: str
    label: str
    actions: tuple[str, ...]


@dataclass(frozen=True)
class ReasonView:
    system: str
    code: str
    display: str


@dataclass(frozen=True)
class FactorRow:
    id: str
    label: str
    status: str
    value: str
    date: str
    sources: str
    reason: str

    @property
    def status_class(self) -> str:  # a class name: only the statuses the contract defines
        return self.status if self.status in _STATUSES else "other"


@dataclass(frozen=True)
class AssessmentView:
    model: str
    recommendation: str
    score: str
    group: str
    cea_rule: str
    factors: tuple[FactorRow, ...]
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class CardView:
    uuid: str
    indicator: str
    summary: str
    detail: Markup
    source: LinkView | None
    topic: str
    links: tuple[LinkView, ...]
    suggestions: tuple[SuggestionView, ...]
    override_reasons: tuple[ReasonView, ...]
    assessment: AssessmentView | None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _http_url(url: Any) -> str | None:
    return url if isinstance(url, str) and urlsplit(url).scheme.lower() in ("http", "https") else None


@cache
def _factor_labels() -> dict[str, dict[str, str]]:
    """Model → factor id → the label the card's own table uses (cards/*.yaml)."""
    labels: dict[str, dict[str, str]] = {}
    for path in sorted(data_dir("cards").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if isinstance(spec, dict) and "model" in spec and isinstance(spec.get("factor_labels"), dict):
            labels[str(spec["model"])] = {str(k): str(v) for k, v in spec["factor_labels"].items()}
    return labels


def _assessment(doc: Any) -> AssessmentView | None:
    if not isinstance(doc, dict):
        return None
    labels = _factor_labels().get(_text(doc.get("model")), {})
    score = doc.get("score") or {}
    lo, hi = score.get("min"), score.get("max")
    rows = tuple(
        FactorRow(
            id=_text(f.get("id")),
            label=labels.get(_text(f.get("id")), _text(f.get("id"))),
            status=_text(f.get("status")),
            value=_text(f.get("value")) or "—",
            date=_text(f.get("date")) or "—",
            sources=", ".join(map(str, f.get("sources") or ())) or "—",
            reason=_text(f.get("reason")),
        )
        for f in doc.get("factors") or ()
        if isinstance(f, dict)
    )
    return AssessmentView(
        model=_text(doc.get("model")),
        recommendation=_text(doc.get("recommendation")),
        score=_text(lo) if lo == hi else f"{lo}–{hi}",
        group=_text(doc.get("group")),
        cea_rule=_text(doc.get("cea_rule")),
        factors=rows,
        evidence=tuple(_text(e) for e in doc.get("evidence") or () if isinstance(e, str)),
    )


def card_view(card: Mapping[str, Any]) -> CardView:
    """One card of the answer, reduced to what the template shows; every string stays plain text."""
    source = card.get("source") or {}
    topic = source.get("topic") or {}
    indicator = _text(card.get("indicator"))
    return CardView(
        uuid=_text(card.get("uuid")),
        indicator=indicator if indicator in _INDICATORS else "info",  # it becomes a class name
        summary=_text(card.get("summary")),
        detail=render_markdown(_text(card.get("detail"))),
        source=LinkView(_text(source.get("label")), _http_url(source.get("url"))) if source else None,
        topic=_text(topic.get("display") or topic.get("code")),
        links=tuple(
            LinkView(_text(lk.get("label")), _http_url(lk.get("url"))) for lk in card.get("links") or ()
        ),
        suggestions=tuple(
            SuggestionView(
                _text(s.get("uuid")),
                _text(s.get("label")),
                tuple(_text(a.get("description")) for a in s.get("actions") or () if a.get("description")),
            )
            for s in card.get("suggestions") or ()
        ),
        override_reasons=tuple(
            ReasonView(_text(r.get("system")), _text(r.get("code")), _text(r.get("display") or r.get("code")))
            for r in card.get("overrideReasons") or ()
        ),
        assessment=_assessment((card.get("extension") or {}).get(ASSESSMENT_KEY)),
    )


def cards_of(answer: Any) -> tuple[CardView, ...]:
    """The cards of a hook answer (`{"cards": [...]}`), as views; anything else has none."""
    if not isinstance(answer, dict):
        return ()
    return tuple(card_view(c) for c in answer.get("cards") or () if isinstance(c, dict))

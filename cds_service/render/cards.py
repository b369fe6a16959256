"""Assessments → CDS Hooks cards, through the templates and evidence of cards/.

With views.py (reading cards back for a page), the only code that knows the card JSON. The view a
template reads is built in detail_view.py, which escapes chart text.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2
import orjson
import yaml

from cds_service import card_ids
from cds_service.clinical.facts.model import PatientFacts
from cds_service.clinical.scoring.factors import UNKNOWN, Assessment, CeaPick, Factor
from cds_service.clinical.scoring.liver import LiverAssessment
from cds_service.clinical.scoring.lung import LungAssessment
from cds_service.hooks.models import Action, Card, Coding, Link, Source, Suggestion, answer_json
from cds_service.jsonio import dump_bytes, dumps, loads
from cds_service.paths import data_dir
from cds_service.render.detail_view import liver_view, lung_view
from cds_service.render.evidence import catalogue, cite, papers, say, statements
from cds_service.render.markdown import environment, md, tidy

TOPIC_SYSTEM = "urn:crc-cds:card-topic"
OVERRIDE_SYSTEM = "urn:crc-cds:override-reason"
ASSESSMENT_KEY = "crc-cds-assessment"
# Optional FHIR data the service could not read: (prefetch key, generic cause), in the service's order.
Unavailable = tuple[tuple[str, str], ...]
# Where cards link the evidence pages when neither CDS_PUBLIC_BASE_URL nor a request names the base
# (`cds-service evaluate`): `serve` and `demo` listen there by default.
DEFAULT_BASE_URL = "http://127.0.0.1:8080"


@cache
def _yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((data_dir("cards") / name).read_text(encoding="utf-8"))


@cache
def _detail_template(name: str) -> jinja2.Template:
    # Compiled once, like the YAML specs: no per-call loader lookup and template file stat.
    return environment().get_template(name)


@cache
def _summary_template(spec_file: str, recommendation: str) -> jinja2.Template:
    return environment().from_string(_yaml(spec_file)["recommendations"][recommendation]["summary"])


def evidence_page_url(base_url: str, model: str) -> str:
    """The model's evidence page (docs/service-contract.md), absolute under the service's public base."""
    return f"{base_url.rstrip('/')}/evidence/{model}"


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


def _assessment_json(model: str, a: Assessment, unavailable: Unavailable = ()) -> dict[str, Any]:
    """The `crc-cds-assessment` extension (docs/service-contract.md); `evidence` is added once rendered."""
    doc: dict[str, Any] = {
        "model": model,
        "recommendation": a.recommendation,
        "score": {"min": a.score_min, "max": a.score_max},
        "group": a.group,
        "factors": [f.assessment() for f in a.factors],
    }
    if a.cea.result is not None:  # the rule that picked a CEA; with no CEA there is nothing it picked
        doc["cea_rule"] = a.cea.rule
    context = getattr(a, "context", ())  # docs/clinical-rules.md §8.27: shown, never scored
    if context:
        doc["context"] = [c.assessment() for c in context]
    if unavailable:
        doc["unavailable"] = [{"search": key, "reason": reason} for key, reason in unavailable]
    return doc


# Treatment states that systemic therapy, or a planned lung ablation / SBRT, could not change (first
# match wins: docs/service-contract.md §4).
_AFTER_SYSTEMIC = (
    "post-local-therapy-follow-up",
    "ablation-guidance",
    "assess-nat-response",
    "assess-nac-response",
)
_AFTER_PLANNED = ("post-local-therapy-follow-up", "ablation-guidance")


def _unavailable_view(view: dict[str, Any], unavailable: Unavailable, facts: PatientFacts) -> dict[str, Any]:
    """The card's line on what the FHIR server would not give, and which checks that left undone
    (docs/clinical-decisions.md; the wording is in the templates)."""
    view["unavailable"] = ", ".join(f"{md(key)} ({md(reason)})" for key, reason in unavailable)
    rec = view["recommendation"]
    view["medications_unavailable"] = facts.medications_unread
    view["systemic_unchecked"] = facts.medications_unread and rec not in _AFTER_SYSTEMIC
    view["planned_unchecked"] = "ServiceRequest" in facts.unread and rec not in _AFTER_PLANNED
    return view


def _links(spec: dict[str, Any], cited: list[str], page_url: str) -> list[Link]:
    """The model's paper, every paper a shown statement quotes, then the evidence page."""
    keys = [spec["source_paper"]]
    for statement_id in cited:
        key = statements()[statement_id]["paper"]
        if key not in keys:
            keys.append(key)
    links = [
        Link(label=papers()[k]["label"], url=papers()[k]["url"], type="absolute")
        for k in keys
        if papers()[k]["url"]
    ]
    links.append(Link(label=spec["evidence_page_label"], url=page_url, type="absolute"))
    return links


MAX_DETAIL_CHARS = 2000  # docs/clinical-rules.md §7
_MORE_CONTEXT = "more in the card's assessment"


def _card(
    spec_file: str,
    template: str,
    view: dict[str, Any],
    assessment: dict[str, Any],
    facts: PatientFacts,
    reasons: list[str],
    suggest_cea: bool,
    base_url: str,
) -> CardDraft:
    spec = _yaml(spec_file)
    recommendation = assessment["recommendation"]
    rec = spec["recommendations"][recommendation]
    paper = papers()[spec["source_paper"]]
    page_url = evidence_page_url(base_url, spec["model"])
    detail, cited = cite(tidy(_detail_template(template).render(a=view, say=say, page_url=page_url)))
    if len(detail) > MAX_DETAIL_CHARS:
        # Over 2,000 characters (docs/clinical-rules.md §7): the supporting evidence, which the evidence page
        # holds in full, gives way first.
        view = {**view, "compact": True}
        detail, cited = cite(tidy(_detail_template(template).render(a=view, say=say, page_url=page_url)))
    # Then the context lines: those left out stay in the assessment's `context`, which the card then
    # points to.
    context = list(view.get("context") or [])
    while len(detail) > MAX_DETAIL_CHARS and context and context != [_MORE_CONTEXT]:
        context = [*context[: -2 if context[-1] == _MORE_CONTEXT else -1], _MORE_CONTEXT]
        view = {**view, "context": context}
        detail, cited = cite(tidy(_detail_template(template).render(a=view, say=say, page_url=page_url)))
    assessment["evidence"] = cited
    card = Card(
        summary=_summary_template(spec_file, recommendation).render(a=view),
        detail=detail,
        indicator=rec["indicator"],
        source=Source(
            label=paper["label"],
            url=paper["url"],
            topic=Coding(system=TOPIC_SYSTEM, code=spec["topic"]["code"], display=spec["topic"]["display"]),
        ),
        links=_links(spec, cited, page_url),
        overrideReasons=[
            Coding(system=OVERRIDE_SYSTEM, code=r["code"], display=r["display"])
            for r in spec["override_reasons"]
        ],
        extension={ASSESSMENT_KEY: assessment},
    )
    # What makes this card this card: its words and its assessment (source, links and override
    # reasons follow from the card spec, the recommendation and the statements it cites).
    content = dumps([spec_file, card.indicator, card.summary, card.detail, assessment], sort_keys=True)
    wanted = ("mdt", "cea") if suggest_cea else ("mdt",)
    card.suggestions = [
        Suggestion(
            label=s["label"],
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
    draft = CardDraft(card, content, wanted, dump_bytes(answer_json([card])["cards"][0]))
    return dataclasses.replace(draft, pieces=_cut(draft))


@dataclass(frozen=True)
class CardDraft:
    """A card as rendered from the chart, before its uuids: they depend on the call's hookInstance
    (`mint`), everything else only on the assessment, the chart and the day."""

    card: Card  # uuid and suggestion uuids not set
    content: str  # what the card uuid is derived from: its words and its assessment
    suggestion_keys: tuple[str, ...]  # one per suggestion, in order
    doc_json: bytes  # the card's JSON without the uuids (empty fields pruned)
    # The card's answer JSON cut where its uuids go: piece, card uuid, piece, first suggestion's
    # uuid, piece... (None when only the document path can write it: see `_cut`).
    pieces: tuple[bytes, ...] | None = None

    @property
    def assessment(self) -> dict[str, Any]:
        """The card's assessment extension (shared: read it, never change it)."""
        return (self.card.extension or {}).get(ASSESSMENT_KEY) or {}

    def with_uuids(self, hook_instance: str) -> Card:
        card = self.card.model_copy(deep=True)
        card.uuid = card_ids.card_uuid(hook_instance, self.content)
        for suggestion, key in zip(card.suggestions, self.suggestion_keys, strict=True):
            suggestion.uuid = card_ids.suggestion_uuid(card.uuid, key)
        return card


@dataclass(frozen=True)
class MintedCard:
    """What the audit trail keeps of a card in an answer."""

    uuid: str
    suggestion_uuids: tuple[str, ...]
    assessment: dict[str, Any]  # shared with the draft: read only


@dataclass(frozen=True)
class Minted:
    """A hook call's answer: its JSON as sent, and its cards' uuids."""

    json: bytes
    cards: tuple[MintedCard, ...]

    def document(self) -> dict[str, Any]:
        """The answer as a document of its own (`{"cards": [...]}`)."""
        return dict(loads(self.json))


def mint(drafts: tuple[CardDraft, ...], hook_instance: str) -> Minted:
    """The hook's answer from drafts: the JSON of `answer_json` of the cards with their uuids.
    Derived from hookInstance and content (a retried call gets the same uuids), and signed with the
    deployment's key so any instance recognises its cards' feedback without the store (card_ids).

    A kept answer is sent again with new uuids only: its bytes are the draft's pieces with the
    uuids between them, the same bytes as writing the whole document, for a fraction of the cost."""
    cards = tuple(_uuids(d, hook_instance) for d in drafts)
    if all(d.pieces is not None for d in drafts):
        texts = [_joined(d.pieces, c) for d, c in zip(drafts, cards, strict=True)]  # type: ignore[arg-type]
        return Minted(b'{"cards":[' + b",".join(texts) + b"]}", cards)
    doc = {"cards": [_document(d, c.uuid, c.suggestion_uuids) for d, c in zip(drafts, cards, strict=True)]}
    return Minted(dump_bytes(doc), cards)


def _uuids(draft: CardDraft, hook_instance: str) -> MintedCard:
    card_uuid = card_ids.card_uuid(hook_instance, draft.content)
    suggestions = tuple(card_ids.suggestion_uuid(card_uuid, key) for key in draft.suggestion_keys)
    return MintedCard(card_uuid, suggestions, draft.assessment)


def _joined(pieces: tuple[bytes, ...], card: MintedCard) -> bytes:
    uuids = (card.uuid, *card.suggestion_uuids)
    out = [pieces[0]]
    for value, piece in zip(uuids, pieces[1:], strict=True):
        out += (value.encode(), piece)
    return b"".join(out)


def _document(draft: CardDraft, card_uuid: str, suggestion_uuids: tuple[str, ...]) -> dict[str, Any]:
    # Parsed again for each answer, so each is a document of its own (nothing shared with the draft).
    doc = {"uuid": card_uuid, **loads(draft.doc_json)}  # `uuid` is the Card's first field
    doc["suggestions"] = [
        # `uuid` follows `label`, as in the Suggestion model; every other field is kept as pruned.
        {"label": s["label"], "uuid": value, **s}
        for s, value in zip(doc["suggestions"], suggestion_uuids, strict=True)
    ]
    return doc


def _cut(draft: CardDraft) -> tuple[bytes, ...] | None:
    """The draft's answer JSON cut at its uuids: written once with a random mark in each uuid's
    place, then split at the marks. A uuid is plain ASCII, written as is, so the answer with real
    uuids is the pieces joined with them. None when a mark is not found exactly once, or the card
    holds what only the standard library writes (dump_bytes' fallback): then `mint` writes the
    whole document, as before."""
    marks = [secrets.token_hex(18) for _ in range(1 + len(draft.suggestion_keys))]
    try:
        text = orjson.dumps(_document(draft, marks[0], tuple(marks[1:])), option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return None
    pieces = []
    for mark in marks:
        quoted = f'"{mark}"'.encode()
        if text.count(quoted) != 1:
            return None
        before, _, text = text.partition(quoted)
        pieces.append(before + b'"')
        text = b'"' + text
    return (*pieces, text)


def _needs_cea(cea: CeaPick, factor: Factor, stale: bool) -> bool:
    # A new CEA helps only when the rule may use the latest result (no local therapy yet).
    return stale or (factor.status == UNKNOWN and cea.result is None and cea.picked_latest)


# Each card: its spec (wording, links, override reasons) and its detail template, in cards/.
_LUNG = ("lung.yaml", "lung_detail.md.j2")
_LIVER = ("liver.yaml", "liver_detail.md.j2")


def override_reason_displays() -> dict[tuple[str, str], str]:
    """The display of every override reason our cards offer, by (system, code): clients may send
    back only the code and system (the CDS Hooks sandbox does), and a report should still name it."""
    return {
        (OVERRIDE_SYSTEM, r["code"]): r["display"]
        for spec_file, _ in (_LUNG, _LIVER)
        for r in _yaml(spec_file)["override_reasons"]
    }


def preload() -> None:
    """Read every card spec and compile every template now rather than on a first call."""
    catalogue()
    for spec_file, template in (_LUNG, _LIVER):
        _detail_template(template)
        for recommendation in _yaml(spec_file)["recommendations"]:
            _summary_template(spec_file, recommendation)


def lung_card(a: LungAssessment, facts: PatientFacts, *, hook_instance: str, **view: Any) -> Card:
    """The lung card with its uuids (`view`: `draft_lung`'s keywords)."""
    return draft_lung(a, facts, **view).with_uuids(hook_instance)


def liver_card(a: LiverAssessment, facts: PatientFacts, *, hook_instance: str, **view: Any) -> Card:
    """The liver card with its uuids (`view`: `draft_liver`'s keywords)."""
    return draft_liver(a, facts, **view).with_uuids(hook_instance)


def draft_lung(
    a: LungAssessment,
    facts: PatientFacts,
    *,
    today: dt.date,
    cea_max_age_days: int,
    unavailable: Unavailable = (),
    base_url: str = DEFAULT_BASE_URL,
    may_order_cea: bool = True,
) -> CardDraft:
    spec = _yaml(_LUNG[0])
    view = _unavailable_view(lung_view(a, facts, spec, today, cea_max_age_days), unavailable, facts)
    assessment = _assessment_json(spec["model"], a, unavailable)
    return _card(
        *_LUNG,
        view,
        assessment,
        facts,
        list(a.lung_sources),
        may_order_cea and _needs_cea(a.cea, a.factors[0], view["cea_stale"]),
        base_url,
    )


def draft_liver(
    a: LiverAssessment,
    facts: PatientFacts,
    *,
    today: dt.date,
    cea_max_age_days: int,
    unavailable: Unavailable = (),
    base_url: str = DEFAULT_BASE_URL,
    may_order_cea: bool = True,
) -> CardDraft:
    spec = _yaml(_LIVER[0])
    view = _unavailable_view(liver_view(a, facts, spec, today, cea_max_age_days), unavailable, facts)
    assessment = _assessment_json(spec["model"], a, unavailable)
    cea_factor = next(f for f in a.factors if f.id == "cea_gt_200")
    return _card(
        *_LIVER,
        view,
        assessment,
        facts,
        list(a.liver_sources),
        may_order_cea and _needs_cea(a.cea, cea_factor, view["cea_stale"]),
        base_url,
    )


def draft_answer(
    lung: LungAssessment | None,
    liver: LiverAssessment | None,
    facts: PatientFacts,
    *,
    today: dt.date,
    cea_max_age_days: int,
    unavailable: Unavailable = (),
    base_url: str = DEFAULT_BASE_URL,
) -> tuple[CardDraft, ...]:
    """The hook's cards, before their uuids (`mint` makes the answer): the lung card first, then the
    liver card.

    `unavailable`: the optional FHIR data that could not be read, (prefetch key, generic cause).
    One answer proposes each order once (docs/clinical-rules.md §8.28): accepting two "Order serum CEA"
    suggestions in an EHR would create two orders, so only the first card that wants one carries it.
    """
    context: dict[str, Any] = {
        "today": today,
        "cea_max_age_days": cea_max_age_days,
        "unavailable": unavailable,
        "base_url": base_url,
    }
    drafts: list[CardDraft] = []
    if lung is not None:
        drafts.append(draft_lung(lung, facts, **context))
    cea_proposed = any("cea" in d.suggestion_keys for d in drafts)
    if liver is not None:
        drafts.append(draft_liver(liver, facts, may_order_cea=not cea_proposed, **context))
    return tuple(drafts)


def answer(
    lung: LungAssessment | None,
    liver: LiverAssessment | None,
    facts: PatientFacts,
    *,
    hook_instance: str,
    **view: Any,
) -> dict[str, Any]:
    """The hook's answer, `{"cards": [...]}` (`view`: `draft_answer`'s keywords)."""
    return mint(draft_answer(lung, liver, facts, **view), hook_instance).document()

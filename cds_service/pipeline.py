"""The request's path, top to bottom: validate → fetch → derive facts → score → recommend → render.

Shared by the HTTP route and `cds-service evaluate`, so both answer with the same bytes.
(Authentication happens in the route, before this, because it depends on the HTTP request.)
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.knowledge.terminology import terminology
from cds_service.clinical.knowledge.thresholds import liver_params, lung_params
from cds_service.clinical.scoring.factors import Assessment
from cds_service.clinical.scoring.liver import assess_liver
from cds_service.clinical.scoring.lung import assess_lung
from cds_service.fetch.prefetch import ChartSource, resolve_chart
from cds_service.hooks.catalogue import Service
from cds_service.hooks.models import HookRequest, parse_hook_request, valid_call_values
from cds_service.kept_answers import Answers as KeptAnswers
from cds_service.kept_answers import Cut
from cds_service.render.cards import DEFAULT_BASE_URL, CardDraft, Minted, draft_answer, mint
from cds_service.render.cards import preload as preload_cards
from cds_service.settings import Settings

log = logging.getLogger("cds_service.engine")  # the name operators filter on, kept across the move


@dataclass
class Outcome:
    """One hook call's answer and what the audit trail needs to know about it."""

    minted: Minted  # the answer's JSON as sent, and its cards' uuids
    hook_instance: str
    patient_id: str
    source: ChartSource
    chart_size: int
    seconds: float
    recommendations: tuple[str, ...] = ()

    @property
    def answer(self) -> dict[str, Any]:
        """The answer as a document (`{"cards": [...]}`), parsed from its JSON."""
        return self.minted.document()


@dataclass(frozen=True)
class _Drafted:
    """A call's answer before its uuids, and whether the same request can be answered from it again."""

    drafts: tuple[CardDraft, ...]
    patient_id: str
    source: ChartSource
    chart_size: int
    recommendations: tuple[str, ...]
    # Nothing was fetched and nothing logged: the answer depends on the request body alone.
    reusable: bool

    def outcome(self, hook_instance: str, started: float) -> Outcome:
        return Outcome(
            mint(self.drafts, hook_instance),
            hook_instance,
            self.patient_id,
            self.source,
            self.chart_size,
            time.perf_counter() - started,
            self.recommendations,
        )


def evaluate(
    request: HookRequest,
    service: Service,
    settings: Settings,
    today: dt.date,
    *,
    issuer: str | None = None,
    base_url: str | None = None,
) -> Outcome:
    """`issuer`: the client JWT's `iss`; `base_url`: where the request reached us, for the cards'
    evidence-page links when CDS_PUBLIC_BASE_URL is not set (without either, the default `serve`
    address)."""
    started = time.perf_counter()
    drafted = _draft(request, service, settings, today, issuer=issuer, base_url=base_url)
    return drafted.outcome(request.hookInstance, started)


def _draft(
    request: HookRequest,
    service: Service,
    settings: Settings,
    today: dt.date,
    *,
    issuer: str | None,
    base_url: str | None,
) -> _Drafted:
    chart, source = resolve_chart(request, service, settings, issuer=issuer)
    facts = derive_facts(chart)
    lung = assess_lung(facts, today=today) if facts.in_scope else None
    liver = assess_liver(facts, lung, today=today) if facts.in_scope else None
    assessments: list[Assessment] = [a for a in (lung, liver) if a is not None]
    drafts = draft_answer(
        lung,
        liver,
        facts,
        today=today,
        cea_max_age_days=settings.cea_max_age_days,
        unavailable=source.unavailable,
        base_url=settings.public_base_url or base_url or DEFAULT_BASE_URL,
    )
    # What logs a warning (a resource skipped as not valid FHIR, another patient's resource dropped)
    # must log it on every call, so such an answer is never reused.
    reusable = not (source.fetched or source.unavailable or facts.skipped or chart.foreign_dropped)
    recommendations = tuple(a.recommendation for a in assessments)
    return _Drafted(drafts, request.context.patientId, source, chart.size, recommendations, reusable)


def warm_up() -> None:
    """Load now what a first call would (value sets, thresholds, card templates and evidence).

    The first clinician is not kept waiting, and `serve` loads it once in the gunicorn master,
    where it is shared by every worker and frozen with the startup heap.
    """
    terminology()
    lung_params()
    liver_params()
    preload_cards()


Answers = KeptAnswers[_Drafted]


def _key_parts(service: Service, today: dt.date, issuer: str | None, base_url: str | None) -> tuple[Any, ...]:
    # None is written as [] (a null would keep a decoded key from being kept); an empty base URL
    # means the default, as None does.
    return (service.id, today.isoformat(), [] if issuer is None else [issuer], base_url or "")


def kept_answer(
    raw: bytes,
    service: Service,
    today: dt.date,
    answers: Answers,
    *,
    issuer: str | None = None,
    base_url: str | None = None,
) -> tuple[Outcome | None, Cut | None]:
    """The answer to a request sent before but for its hookInstance and access token, from its
    bytes alone (nothing parsed but those two values, validated as `answer` would), or None; and
    the request's bytes cut for its key (None when they cannot be), for `answer` to keep it by."""
    started = time.perf_counter()
    cut = answers.cut(raw, *_key_parts(service, today, issuer, base_url))
    hit = answers.find(raw, cut) if cut is not None else None
    if hit is None or not valid_call_values(hit.hook_instance, hit.fhir_authorization):
        return None, cut  # a bad value: `answer` says what is wrong with it
    return hit.kept.outcome(hit.hook_instance, started), cut


def answer(
    body: Any,
    service: Service,
    settings: Settings,
    today: dt.date,
    *,
    issuer: str | None = None,
    base_url: str | None = None,
    answers: Answers | None = None,
    raw: bytes | None = None,
    looked_up: tuple[Outcome | None, Cut | None] | None = None,
) -> Outcome:
    """Validate a decoded request body for `service` and evaluate it (`issuer`: the client JWT's
    `iss`, which chooses the fhirServer allowlist when it is set per issuer); `answers`: kept answers
    to reuse for an identical request, and to keep this one in; `raw`: the body as sent;
    `looked_up`: what `kept_answer` said of `raw`, when the caller asked it already."""
    request = parse_hook_request(body, service.hook)
    if answers is None:
        return evaluate(request, service, settings, today, issuer=issuer, base_url=base_url)
    cut = None
    if raw is not None:
        if looked_up is None:
            looked_up = kept_answer(raw, service, today, answers, issuer=issuer, base_url=base_url)
        outcome, cut = looked_up
        if outcome is not None:
            return outcome
    started = time.perf_counter()
    parts = _key_parts(service, today, issuer, base_url)
    drafted = None
    if cut is None:  # not found by its bytes: by its members
        key = answers.decoded_key(body, *parts)
        drafted = answers.get_decoded(key) if key is not None else None
    if drafted is None:
        drafted = _draft(request, service, settings, today, issuer=issuer, base_url=base_url)
        if drafted.reusable:
            answers.keep(raw, cut, body, parts, drafted)
    return drafted.outcome(request.hookInstance, started)

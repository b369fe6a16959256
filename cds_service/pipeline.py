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
from cds_service.hooks.models import HookRequest, parse_hook_request
from cds_service.render.cards import DEFAULT_BASE_URL
from cds_service.render.cards import answer as render_answer
from cds_service.render.cards import preload as preload_cards
from cds_service.settings import Settings

log = logging.getLogger("cds_service.engine")  # the name operators filter on, kept across the move


@dataclass
class Outcome:
    """One hook call's answer and what the audit trail needs to know about it."""

    answer: dict[str, Any]
    source: ChartSource
    chart_size: int
    seconds: float
    recommendations: tuple[str, ...] = ()


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
    chart, source = resolve_chart(request, service, settings, issuer=issuer)
    facts = derive_facts(chart)
    lung = assess_lung(facts, today=today) if facts.in_scope else None
    liver = assess_liver(facts, lung, today=today) if facts.in_scope else None
    assessments: list[Assessment] = [a for a in (lung, liver) if a is not None]
    doc = render_answer(
        lung,
        liver,
        facts,
        hook_instance=request.hookInstance,
        today=today,
        cea_max_age_days=settings.cea_max_age_days,
        unavailable=source.unavailable,
        base_url=settings.public_base_url or base_url or DEFAULT_BASE_URL,
    )
    recommendations = [a.recommendation for a in assessments]
    return Outcome(doc, source, chart.size, time.perf_counter() - started, tuple(recommendations))


def warm_up() -> None:
    """Load now what a first call would (value sets, thresholds, card templates and evidence).

    The first clinician is not kept waiting, and `serve` loads it once in the gunicorn master,
    where it is shared by every worker and frozen with the startup heap.
    """
    terminology()
    lung_params()
    liver_params()
    preload_cards()


def answer(
    body: Any,
    service: Service,
    settings: Settings,
    today: dt.date,
    *,
    issuer: str | None = None,
    base_url: str | None = None,
) -> Outcome:
    """Validate a decoded request body for `service` and evaluate it (`issuer`: the client JWT's
    `iss`, which chooses the fhirServer allowlist when it is set per issuer)."""
    request = parse_hook_request(body, service.hook)
    return evaluate(request, service, settings, today, issuer=issuer, base_url=base_url)

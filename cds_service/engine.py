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

from .catalog import Service
from .facts import derive_facts
from .fhir_data import ChartSource, resolve_chart
from .liver import assess_liver
from .lung import assess_lung
from .protocol import CardsResponse, HookRequest, answer_json, parse_hook_request
from .render import liver_card, lung_card
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One hook call's answer and what the audit trail needs to know about it."""

    answer: dict[str, Any]
    source: ChartSource
    chart_size: int
    seconds: float
    recommendations: tuple[str, ...] = ()


def evaluate(request: HookRequest, service: Service, settings: Settings, today: dt.date) -> Outcome:
    started = time.perf_counter()
    chart, source = resolve_chart(request, service, settings)
    facts = derive_facts(chart)
    cards = []
    recommendations: list[str] = []
    if facts.in_scope:
        lung = assess_lung(facts)
        if lung is not None:
            cards.append(
                lung_card(
                    lung,
                    facts,
                    hook_instance=request.hookInstance,
                    user_id=request.context.userId,
                    today=today,
                    cea_max_age_days=settings.cea_max_age_days,
                )
            )
            recommendations.append(lung.recommendation)
        liver = assess_liver(facts, lung)
        if liver is not None:
            cards.append(
                liver_card(
                    liver,
                    facts,
                    hook_instance=request.hookInstance,
                    user_id=request.context.userId,
                    today=today,
                    cea_max_age_days=settings.cea_max_age_days,
                )
            )
            recommendations.append(liver.recommendation)
    answer = answer_json(CardsResponse(cards=cards))
    return Outcome(answer, source, chart.size, time.perf_counter() - started, tuple(recommendations))


def answer(body: Any, service: Service, settings: Settings, today: dt.date) -> Outcome:
    """Validate a decoded request body for `service` and evaluate it."""
    request = parse_hook_request(body, service.hook)
    return evaluate(request, service, settings, today)

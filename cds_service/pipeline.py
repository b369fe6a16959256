"""The request's path, top to bottom: validate → fetch → derive facts → score → recommend → render.

Shared by the HTTP route and `cds-service evaluate`, so both answer with the same bytes.
(Authentication happens in the route, before this, because it depends on the HTTP request.)
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.kept import KeptLru
from cds_service.clinical.knowledge.terminology import terminology
from cds_service.clinical.knowledge.thresholds import liver_params, lung_params
from cds_service.clinical.scoring.factors import Assessment
from cds_service.clinical.scoring.liver import assess_liver
from cds_service.clinical.scoring.lung import assess_lung
from cds_service.fetch.prefetch import ChartSource, resolve_chart
from cds_service.hooks.catalogue import Service
from cds_service.hooks.models import HookRequest, parse_hook_request
from cds_service.render.cards import DEFAULT_BASE_URL, CardDraft, Minted, draft_answer, mint
from cds_service.render.cards import preload as preload_cards
from cds_service.settings import Settings

log = logging.getLogger("cds_service.engine")  # the name operators filter on, kept across the move


@dataclass
class Outcome:
    """One hook call's answer and what the audit trail needs to know about it."""

    minted: Minted  # the answer's JSON as sent, and its cards' uuids
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
    source: ChartSource
    chart_size: int
    recommendations: tuple[str, ...]
    # Nothing was fetched and nothing logged: the answer depends on the request body alone.
    reusable: bool

    def outcome(self, hook_instance: str, started: float) -> Outcome:
        minted = mint(self.drafts, hook_instance)
        return Outcome(
            minted, self.source, self.chart_size, time.perf_counter() - started, self.recommendations
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
    return _Drafted(drafts, source, chart.size, recommendations, reusable)


# Members the key leaves out: the call's own id, and the FHIR access token (never kept after the
# call). Whether anything is fetched depends on the prefetch and fhirServer, which the key holds, not
# on the token, and a kept answer is one for which nothing was fetched.
_NOT_IN_KEY = frozenset({"hookInstance", "fhirAuthorization"})


_HOOK_INSTANCE = b'"hookInstance"'
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")


def _raw_without_hook_instance(raw: bytes, body: dict[str, Any]) -> bytes | None:
    """The request bytes with the value of their one `"hookInstance"` member cut out, or None.

    That value must be the request's hookInstance as orjson writes it. Two requests with the same
    result differ only in hookInstance: their texts (valid JSON, so no two occurrences can overlap)
    share every byte before and after the value, so the member is in the same place in both, and
    were it not the request's own (a nested member of that name, the request's own written with
    escapes) both values would equal the same hookInstance and the requests would be the same.
    A request with fhirAuthorization is not keyed by its bytes (no access token is kept).
    """
    hook_instance = body.get("hookInstance")
    if type(hook_instance) is not str or "fhirAuthorization" in body or raw.count(_HOOK_INSTANCE) != 1:
        return None
    colon = _COLON.match(raw, raw.index(_HOOK_INSTANCE) + len(_HOOK_INSTANCE))
    value = orjson.dumps(hook_instance)
    if colon is None or raw[colon.end() : colon.end() + len(value)] != value:
        return None
    return raw[: colon.end()] + raw[colon.end() + len(value) :]


class Answers:
    """A worker's recent answers by request, for patient-view calls that send the same chart again.

    An EHR calls patient-view each time a clinician opens the chart, with the same prefetch and a
    new hookInstance. When the whole chart was prefetched (nothing fetched from a FHIR server) and
    reading it logged nothing, the answer depends only on the request body, the day and the
    service's settings: it is kept, without its uuids, by the request's exact JSON text (every
    member but hookInstance and fhirAuthorization, in the order sent) with the service, the day,
    the evidence base URL and the caller's issuer. Only an identical request gets a kept answer
    back, with uuids minted from its own hookInstance, so the answer is the one evaluating it again
    would give. At most `entries` answers and `json_bytes` bytes of request text are kept (least
    recently used out first); a request over `largest` bytes, or holding what its JSON text cannot
    tell apart (NaN, integers beyond 64 bits, lone surrogates), is evaluated every time.
    """

    def __init__(self, entries: int = 64, json_bytes: int = 8_000_000, largest: int = 1_000_000) -> None:
        self._largest = largest
        self._kept: KeptLru[bytes, _Drafted] = KeptLru(entries, json_bytes, len)

    def key(self, body: dict[str, Any], *parts: Any, raw: bytes | None = None) -> bytes | None:
        """The request's key: `parts` (what else the answer depends on) and its JSON text without
        hookInstance and fhirAuthorization — the bytes as sent (`raw`) when they show where
        hookInstance is, else the decoded body written again. None when it must not be kept."""
        head = orjson.dumps(parts)
        text = _raw_without_hook_instance(raw, body) if raw is not None else None
        if text is not None:
            return None if len(text) > self._largest else b"r" + head + text
        members = {k: v for k, v in body.items() if k not in _NOT_IN_KEY}
        try:
            text = orjson.dumps(members, option=orjson.OPT_PASSTHROUGH_DATETIME)
        except TypeError:  # integers over 64 bits, lone surrogates, non-JSON values
            return None
        # orjson writes NaN and infinities as null: a request with a null is not kept.
        return None if len(text) > self._largest or b"null" in text else b"d" + head + text

    def get(self, key: bytes) -> _Drafted | None:
        return self._kept.get(key)

    def put(self, key: bytes, drafted: _Drafted) -> None:
        self._kept.put(key, drafted)

    def clear(self) -> None:
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)


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
    answers: Answers | None = None,
    raw: bytes | None = None,
) -> Outcome:
    """Validate a decoded request body for `service` and evaluate it (`issuer`: the client JWT's
    `iss`, which chooses the fhirServer allowlist when it is set per issuer); `answers`: kept answers
    to reuse for an identical request, and to keep this one in; `raw`: the body as sent."""
    request = parse_hook_request(body, service.hook)
    if answers is None:
        return evaluate(request, service, settings, today, issuer=issuer, base_url=base_url)
    started = time.perf_counter()
    # None is written as [] (a null would keep the request from being kept); an empty base URL
    # means the default, as None does.
    key = answers.key(
        body, service.id, today.isoformat(), [] if issuer is None else [issuer], base_url or "", raw=raw
    )
    drafted = answers.get(key) if key is not None else None
    if drafted is None:
        drafted = _draft(request, service, settings, today, issuer=issuer, base_url=base_url)
        if key is not None and drafted.reusable:
            answers.put(key, drafted)
    return drafted.outcome(request.hookInstance, started)

"""A clinician's feedback on a card: validated against the audit trail's cards, stored once.

`receive_feedback` checks a feedback POST names cards (and suggestions) this service returned —
written by `audit.AuditTrail` — and stores it. Flask-free: app.py calls it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from cds_service.errors import ServiceError
from cds_service.hooks.models import FeedbackEntry, parse_feedback
from cds_service.store.audit import AuditTrail
from cds_service.store.database import FeedbackRecord, FeedbackResult
from cds_service.telemetry import metrics

log = logging.getLogger(__name__)

# How long an unknown card is looked for before the 422: well above the few milliseconds another
# worker takes to commit the audit of a card it has just answered.
UNKNOWN_CARD_GRACE_S = 0.25
# How long feedback waits for this process's queued audit records before answering 503.
FLUSH_TIMEOUT_S = 5.0


class UnknownReference(ServiceError):
    """Feedback names a card (or suggestion) this service never returned: nothing is stored.

    422, not 404: the endpoint exists and the body is well-formed; what it refers to is unknown.
    """

    status = 422
    issue_code = "not-found"


class StoreUnavailable(ServiceError):
    """The store cannot take the feedback now (database down, locked too long): the EHR may retry."""

    status = 503
    issue_code = "transient"


def receive_feedback(body: Any, service_id: str, audit: AuditTrail) -> FeedbackResult:
    """Validate a feedback body (400), check its cards are ours (422), store it once."""
    entries = parse_feedback(body)
    store = audit.store
    try:
        known = _known_cards(audit, service_id, {e.card for e in entries})
        _check_references(entries, known)
        result = store.record_feedback(service_id, [_record(e) for e in entries], dt.datetime.now(dt.UTC))
    except SQLAlchemyError as exc:
        metrics.store_error("record_feedback")
        log.error("could not store feedback for %s: %s: %s", service_id, type(exc).__name__, _first_line(exc))
        raise StoreUnavailable(
            "the feedback store is unavailable; nothing was stored, try again later"
        ) from None
    metrics.observe_feedback(service_id, result)
    log.info("feedback for %s: %d stored, %d duplicate(s)", service_id, result.stored, result.duplicates)
    return result


def _known_cards(audit: AuditTrail, service_id: str, cards: set[str]) -> dict[str, frozenset[str]]:
    """The cards among `cards` the service returned, each with its suggestion uuids.

    Audit records are written just behind the answers: this process's queue is flushed first, and
    a card still missing is looked for again for a moment, since the worker that answered it may be
    another process committing it right now (an EHR can post feedback milliseconds after a card).
    """
    if not audit.flush(FLUSH_TIMEOUT_S):
        # Our own audit records are stuck (database locked or down): "unknown card" would be wrong.
        metrics.store_error("record_feedback")
        log.error("feedback for %s refused: %d audit record(s) still unwritten", service_id, audit.pending)
        raise StoreUnavailable("the audit store is busy; nothing was stored, try again later")
    known = audit.store.card_suggestions(service_id, cards)
    deadline = time.monotonic() + UNKNOWN_CARD_GRACE_S
    while known.keys() < cards and time.monotonic() < deadline:
        time.sleep(0.02)
        known = audit.store.card_suggestions(service_id, cards)
    return known


def _check_references(entries: list[FeedbackEntry], known: Mapping[str, frozenset[str]]) -> None:
    unknown_cards = sorted({e.card for e in entries} - known.keys())
    if unknown_cards:
        raise UnknownReference(
            f"unknown card uuid {', '.join(unknown_cards[:3])}: feedback must name a card this "
            "service returned; nothing was stored"
        )
    for entry in entries:
        unknown = sorted({s.id for s in entry.acceptedSuggestions} - known[entry.card])
        if unknown:
            raise UnknownReference(
                f"card {entry.card} has no suggestion {', '.join(unknown[:3])}; nothing was stored"
            )


def _record(entry: FeedbackEntry) -> FeedbackRecord:
    reason = entry.overrideReason
    coding = reason.reason if reason else None
    return FeedbackRecord(
        card_uuid=entry.card,
        outcome=entry.outcome,
        accepted_suggestions=tuple(s.id for s in entry.acceptedSuggestions),
        override_system=coding.system if coding else None,
        override_code=coding.code if coding else None,
        override_display=coding.display if coding else None,
        user_comment=reason.userComment if reason else None,
        outcome_timestamp=entry.outcomeTimestamp,
    )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else "-"

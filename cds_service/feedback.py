"""What happens to a hook call's answer and a clinician's feedback on it: the audit trail.

`record_call` writes each answered hook call (with its cards) to the store; `receive_feedback`
validates a feedback POST against those cards and stores it. Flask-free: app.py calls these.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from . import metrics
from .engine import Outcome
from .errors import ServiceError
from .protocol import FeedbackEntry, parse_feedback
from .store import CallRecord, FeedbackRecord, FeedbackResult, Store, cards_of

log = logging.getLogger(__name__)


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


def record_call(
    store: Store, body: Mapping[str, Any], service_id: str, outcome: Outcome, latency_s: float
) -> None:
    """Audit one answered hook call. Never raises: the clinician's answer matters more than its audit.

    `body` has been validated by the engine already (hookInstance and context.patientId exist).
    """
    try:
        cards = cards_of(outcome.answer)
        metrics.observe_answer(service_id, outcome, cards)
        store.record_call(
            CallRecord(
                hook_instance=body["hookInstance"],
                service_id=service_id,
                patient_id=body["context"]["patientId"],
                received_at=dt.datetime.now(dt.UTC),
                fhir_mode=outcome.source.fhir_mode,
                latency_ms=round(latency_s * 1000, 3),
                cards=cards,
            )
        )
    except Exception as exc:  # any failure: log it (no values: hide_parameters) and answer anyway
        metrics.store_error("record_call")
        log.error("could not audit a %s hook call: %s: %s", service_id, type(exc).__name__, _first_line(exc))


def receive_feedback(body: Any, service_id: str, store: Store) -> FeedbackResult:
    """Validate a feedback body (400), check its cards are ours (422), store it once."""
    entries = parse_feedback(body)
    try:
        known = store.card_suggestions(service_id, {e.card for e in entries})
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

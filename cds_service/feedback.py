"""A clinician's feedback on a card: checked to name cards this service returned, then kept durably.

`receive_feedback` checks a feedback POST names cards (and suggestions) this service returned and
spools it (`AuditTrail.record_feedback`: on disk before the 200, in the database a moment later,
each entry once). Flask-free: app.py calls it.

How a card is known to be ours: its uuid carries a signature made with the deployment's key
(`card_ids`), so any instance sharing CDS_AUDIT_KEY recognises any instance's cards at once, whether
or not their audit rows have reached the database, and while the database is down. Only a card
without a valid signature here (CDS_AUDIT_KEY unset and the card from another instance or an earlier
run, or a card from before the key was set) is looked up in the audit store, waiting a moment for a
row another worker may be committing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from cds_service import card_ids
from cds_service.errors import ServiceError
from cds_service.hooks.models import FeedbackEntry, parse_feedback
from cds_service.store.audit import AuditTrail
from cds_service.store.records import FeedbackRecord
from cds_service.store.schema import StoreDown
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


def receive_feedback(body: Any, service_id: str, audit: AuditTrail) -> int:
    """Validate a feedback body (400), check its cards are ours (422), keep it; the entries kept."""
    entries = parse_feedback(body)
    unsigned = [e for e in entries if not _signed_by_us(e)]
    if unsigned:
        try:
            known = _known_cards(audit, service_id, {e.card for e in unsigned})
        except StoreDown as exc:
            metrics.store_error("record_feedback")
            log.error("could not check feedback for %s: %s", service_id, exc)
            raise StoreUnavailable(
                "the feedback store is unavailable; nothing was stored, try again later"
            ) from None
        _check_references(unsigned, known)
    audit.record_feedback(service_id, [_record(e) for e in entries])  # durable once it returns
    log.info("feedback for %s: %d entr%s kept", service_id, len(entries), "y" if len(entries) == 1 else "ies")
    return len(entries)


def _signed_by_us(entry: FeedbackEntry) -> bool:
    return card_ids.is_ours(entry.card) and all(
        card_ids.belongs_to(s.id, entry.card) for s in entry.acceptedSuggestions
    )


def _known_cards(audit: AuditTrail, service_id: str, cards: set[str]) -> dict[str, frozenset[str]]:
    """The cards among `cards` the audit store holds, each with its suggestion uuids (unsigned cards).

    Audit records reach the database just behind the answers: this process's spool is forwarded
    first, and a card still missing is looked for again for a moment, since the worker that answered
    it may be another process forwarding it right now.
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

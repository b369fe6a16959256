"""What the store records: plain values handed to it by the audit trail and the feedback endpoint."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cds_service.ids import UniqueIds


def new_record_id() -> str:
    """A record's own id: the database keeps it unique, so replaying a spooled record is harmless."""
    return _RECORD_IDS.next_id()


_RECORD_IDS = UniqueIds()


@dataclass(frozen=True)
class CardRecord:
    uuid: str
    model: str | None = None
    recommendation: str | None = None
    score_min: int | None = None
    score_max: int | None = None
    group: str | None = None
    suggestion_uuids: tuple[str, ...] = ()


@dataclass(frozen=True)
class CallRecord:
    hook_instance: str
    service_id: str
    patient_id: str  # hashed by the store, never written as is
    received_at: dt.datetime
    fhir_mode: str
    latency_ms: float
    cards: tuple[CardRecord, ...] = ()
    record_id: str = field(default_factory=new_record_id)


@dataclass(frozen=True)
class FeedbackRecord:
    card_uuid: str
    outcome: str
    accepted_suggestions: tuple[str, ...] = ()
    override_system: str | None = None
    override_code: str | None = None
    override_display: str | None = None
    user_comment: str | None = None
    outcome_timestamp: dt.datetime | None = None

    def dedupe_key(self, service_id: str, post_id: str) -> str:
        """Same service, card, content and `outcomeTimestamp` → same key: a retried POST is not a
        second answer. Without a timestamp nothing tells a retry from a second clinician giving the
        same answer, so the entry is keyed to its POST (`post_id`): each POST is stored, and only a
        replay of the same spooled POST (or an entry repeated within it) collapses."""
        content = [
            service_id,
            None if self.outcome_timestamp else post_id,
            self.card_uuid,
            self.outcome,
            sorted(self.accepted_suggestions),
            self.override_system,
            self.override_code,
            self.user_comment,
            self.outcome_timestamp.astimezone(dt.UTC).isoformat() if self.outcome_timestamp else None,
        ]
        return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class FeedbackResult:
    stored: int
    duplicates: int
    stored_outcomes: tuple[str, ...] = ()  # the outcome of each newly stored entry


def cards_of(answer: Mapping[str, Any]) -> tuple[CardRecord, ...]:
    """The audit view of an answer's cards (those with a uuid: the others cannot get feedback)."""
    return tuple(
        card_record(
            card["uuid"],
            (card.get("extension") or {}).get("crc-cds-assessment") or {},
            tuple(s["uuid"] for s in card.get("suggestions", []) if isinstance(s.get("uuid"), str)),
        )
        for card in answer.get("cards", [])
        if isinstance(card.get("uuid"), str)
    )


def card_record(uuid: str, assessment: Mapping[str, Any], suggestion_uuids: tuple[str, ...]) -> CardRecord:
    """The audit view of one card: its uuids and what its assessment extension says."""
    score = assessment.get("score") or {}
    return CardRecord(
        uuid=uuid,
        model=assessment.get("model"),
        recommendation=assessment.get("recommendation"),
        score_min=score.get("min"),
        score_max=score.get("max"),
        group=assessment.get("group"),
        suggestion_uuids=suggestion_uuids,
    )


# --- the spooled form: one JSON line per record (see spool.py), already hashed, no patient id ----------


def spooled_call(call: CallRecord, patient_hash: str) -> dict[str, Any]:
    if call.received_at.tzinfo is None:
        raise ValueError("naive datetime given to the store; use an aware (UTC) datetime")
    return {
        "t": "call",
        "rid": call.record_id,
        "at": call.received_at.timestamp(),
        "hi": call.hook_instance,
        "sv": call.service_id,
        "ph": patient_hash,
        "fm": call.fhir_mode,
        "ms": call.latency_ms,
        "cards": [
            [c.uuid, c.model, c.recommendation, c.score_min, c.score_max, c.group, list(c.suggestion_uuids)]
            for c in call.cards
        ],
    }


def spooled_feedback(
    service_id: str, entries: Iterable[FeedbackRecord], received_at: dt.datetime, post_id: str
) -> dict[str, Any]:
    return {
        "t": "feedback",
        "rid": post_id,
        "at": received_at.timestamp(),
        "sv": service_id,
        "e": [
            [
                e.card_uuid,
                e.outcome,
                list(e.accepted_suggestions),
                e.override_system,
                e.override_code,
                e.override_display,
                e.user_comment,
                e.outcome_timestamp.isoformat() if e.outcome_timestamp else None,
            ]
            for e in entries
        ],
    }


def feedback_of(spooled: Mapping[str, Any]) -> list[FeedbackRecord]:
    return [
        FeedbackRecord(
            card_uuid=card,
            outcome=outcome,
            accepted_suggestions=tuple(accepted),
            override_system=system,
            override_code=code,
            override_display=display,
            user_comment=comment,
            outcome_timestamp=dt.datetime.fromisoformat(when) if when else None,
        )
        for card, outcome, accepted, system, code, display, comment, when in spooled["e"]
    ]


def utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)

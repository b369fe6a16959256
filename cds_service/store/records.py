"""What the store records: plain values handed to it by the audit trail and the feedback endpoint."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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

    def dedupe_key(self, service_id: str) -> str:
        """Same service, card and content → same key (a retried POST is not a second answer)."""
        content = [
            service_id,
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
    records = []
    for card in answer.get("cards", []):
        if not isinstance(card.get("uuid"), str):
            continue
        assessment = (card.get("extension") or {}).get("crc-cds-assessment") or {}
        score = assessment.get("score") or {}
        records.append(
            CardRecord(
                uuid=card["uuid"],
                model=assessment.get("model"),
                recommendation=assessment.get("recommendation"),
                score_min=score.get("min"),
                score_max=score.get("max"),
                group=assessment.get("group"),
                suggestion_uuids=tuple(
                    s["uuid"] for s in card.get("suggestions", []) if isinstance(s.get("uuid"), str)
                ),
            )
        )
    return tuple(records)

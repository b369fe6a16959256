"""The store's reads and writes: one short transaction each (see `database` for engines and locks)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select

from cds_service.store.records import CallRecord, CardRecord, FeedbackRecord, FeedbackResult
from cds_service.store.schema import client_jti, feedback, hook_call, hook_card, insert_once


@dataclass
class Store:
    engine: Engine
    audit_key: bytes = field(repr=False)

    def patient_hash(self, patient_id: str) -> str:
        return hmac.new(self.audit_key, f"Patient/{patient_id}".encode(), hashlib.sha256).hexdigest()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (on SQLite a plain BEGIN, so it does not block writers)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(cds_read_only=True)
            with conn.begin():
                yield conn

    def record_call(self, call: CallRecord) -> int:
        """Write one hook call's audit record now; its row id."""
        return self.record_calls([call])[0]

    def record_calls(self, calls: Iterable[CallRecord]) -> list[int]:
        """Write several audit records in one transaction (one commit, one fsync); their row ids."""
        ids = []
        with self._write() as conn:
            for call in calls:
                call_id = conn.execute(
                    _INSERT_CALL,
                    {
                        "hook_instance": call.hook_instance,
                        "service_id": call.service_id,
                        "received_at": call.received_at,
                        "patient_hash": self.patient_hash(call.patient_id),
                        "fhir_mode": call.fhir_mode,
                        "latency_ms": call.latency_ms,
                        "card_count": len(call.cards),
                    },
                ).scalar_one()
                if call.cards:
                    conn.execute(_INSERT_CARD, [_card_row(call_id, card) for card in call.cards])
                ids.append(int(call_id))
        return ids

    def card_suggestions(self, service_id: str, card_uuids: Iterable[str]) -> dict[str, frozenset[str]]:
        """The cards of `service_id` among `card_uuids`, each with its suggestion uuids."""
        wanted = sorted(set(card_uuids))
        if not wanted:
            return {}
        found: dict[str, frozenset[str]] = {}
        with self.read() as conn:
            for card_uuid, suggestions in conn.execute(
                _CARDS_OF_SERVICE, {"service_id": service_id, "uuids": wanted}
            ):
                found[card_uuid] = found.get(card_uuid, frozenset()) | frozenset(suggestions or ())
        return found

    def record_feedback(
        self, service_id: str, entries: Iterable[FeedbackRecord], received_at: dt.datetime
    ) -> FeedbackResult:
        """Store each entry once; an entry already stored (same content) counts as a duplicate."""
        rows: dict[str, dict[str, Any]] = {}
        for entry in entries:  # a body repeating an entry stores it once, too
            rows.setdefault(entry.dedupe_key(service_id), _feedback_row(service_id, entry, received_at))
        outcomes = []
        with self._write() as conn:
            insert_feedback = insert_once(conn.dialect.name, "feedback")
            for key, row in rows.items():
                if conn.execute(insert_feedback, {"dedupe_key": key, **row}).first() is not None:
                    outcomes.append(row["outcome"])
        return FeedbackResult(len(outcomes), len(rows) - len(outcomes), tuple(outcomes))

    def claim_jti(self, jti: str, issuer: str, expires_at: dt.datetime) -> bool:
        """True the first time (issuer, jti) is seen, False for a replay; atomic across processes.

        Expired ids are pruned first: a token past its `exp` is refused by the JWT check anyway,
        so forgetting its jti cannot let a replay through.
        """
        now = dt.datetime.now(dt.UTC)
        with self._write() as conn:
            conn.execute(_PRUNE_JTI, {"now": now})
            claim = insert_once(conn.dialect.name, "client_jti")
            return (
                conn.execute(claim, {"issuer": issuer, "jti": jti, "expires_at": expires_at}).first()
                is not None
            )

    def counts(self) -> dict[str, int]:
        """Rows per table (for tests, the load test and operators' sanity checks)."""
        with self.read() as conn:
            return {
                table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (hook_call, hook_card, feedback, client_jti)
            }


# Statements built once: they run on every hook call or feedback POST, and building one costs
# more than running it.
_INSERT_CALL = insert(hook_call).returning(hook_call.c.id)
_INSERT_CARD = insert(hook_card)
_PRUNE_JTI = delete(client_jti).where(client_jti.c.expires_at < bindparam("now"))
_CARDS_OF_SERVICE = (
    select(hook_card.c.card_uuid, hook_card.c.suggestion_uuids)
    .join(hook_call, hook_call.c.id == hook_card.c.call_id)
    .where(
        hook_call.c.service_id == bindparam("service_id"),
        hook_card.c.card_uuid.in_(bindparam("uuids", expanding=True)),
    )
)


def _card_row(call_id: int, card: CardRecord) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "card_uuid": card.uuid,
        "model": card.model,
        "recommendation": card.recommendation,
        "score_min": card.score_min,
        "score_max": card.score_max,
        "risk_group": card.group,
        "suggestion_uuids": list(card.suggestion_uuids),
    }


def _feedback_row(service_id: str, entry: FeedbackRecord, received_at: dt.datetime) -> dict[str, Any]:
    return {
        "service_id": service_id,
        "card_uuid": entry.card_uuid,
        "outcome": entry.outcome,
        "accepted_suggestions": list(entry.accepted_suggestions),
        "override_system": entry.override_system,
        "override_code": entry.override_code,
        "override_display": entry.override_display,
        "user_comment": entry.user_comment,
        "outcome_timestamp": entry.outcome_timestamp,
        "received_at": received_at,
    }

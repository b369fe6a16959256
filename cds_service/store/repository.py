"""The store's reads and writes: one short transaction each (see `database` for engines and locks)."""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select
from sqlalchemy.exc import SQLAlchemyError

from cds_service.store.records import (
    CallRecord,
    FeedbackRecord,
    FeedbackResult,
    feedback_of,
    new_record_id,
    spooled_call,
    utc,
)
from cds_service.store.schema import (
    StoreDown,
    client_jti,
    feedback,
    hook_call,
    hook_card,
    insert_once,
    served_base,
)


@dataclass
class Store:
    engine: Engine
    audit_key: bytes = field(repr=False)
    # Where the audit trail spools (None: a private folder, e.g. for an in-memory database), whether
    # it fsyncs, its cap, and the secret card uuids are signed with (open_store: CDS_AUDIT_KEY, else
    # the run's random key; None: not signed).
    spool_dir: Path | None = None
    spool_fsync: bool = True
    spool_sync_before_answer: bool = False
    spool_max_bytes: int | None = None
    card_key: bytes | None = field(default=None, repr=False)

    def patient_hash(self, patient_id: str) -> str:
        return hmac.digest(self.audit_key, f"Patient/{patient_id}".encode(), "sha256").hex()

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
        rows = [spooled_call(call, self.patient_hash(call.patient_id)) for call in calls]
        with self._write() as conn:
            ids = _insert_calls(conn, rows)
        return [ids[row["rid"]] for row in rows if row["rid"] in ids]

    def write_spooled(self, records: list[dict[str, Any]]) -> list[tuple[str, FeedbackResult]]:
        """Spooled records (see records.spooled_*) in one transaction; each feedback POST's result.

        Idempotent: a record already written (same record id, same feedback key) is skipped.
        """
        calls = [r for r in records if r.get("t") == "call"]
        results = []
        with self._write() as conn:
            if calls:
                _insert_calls(conn, calls)
            for r in records:
                if r.get("t") == "feedback":
                    entries = feedback_of(r)
                    results.append(
                        (r["sv"], _insert_feedback(conn, r["sv"], entries, utc(r["at"]), r["rid"]))
                    )
        return results

    def card_suggestions(self, service_id: str, card_uuids: Iterable[str]) -> dict[str, frozenset[str]]:
        """The cards of `service_id` among `card_uuids`, each with its suggestion uuids (StoreDown)."""
        with _store_down():
            return self._card_suggestions(service_id, card_uuids)

    def _card_suggestions(self, service_id: str, card_uuids: Iterable[str]) -> dict[str, frozenset[str]]:
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
        """Store one POST's entries now (the service spools them instead: `write_spooled`)."""
        with self._write() as conn:
            return _insert_feedback(conn, service_id, entries, received_at, new_record_id())

    def claim_jti(self, jti: str, issuer: str, expires_at: dt.datetime) -> bool:
        """True the first time (issuer, jti) is seen, False for a replay; atomic across processes.

        Expired ids are pruned first: a token past its `exp` is refused by the JWT check anyway,
        so forgetting its jti cannot let a replay through. StoreDown when the database fails.
        """
        with _store_down():
            return self._claim_jti(jti, issuer, expires_at)

    def _claim_jti(self, jti: str, issuer: str, expires_at: dt.datetime) -> bool:
        now = dt.datetime.now(dt.UTC)
        with self._write() as conn:
            conn.execute(_PRUNE_JTI, {"now": now})
            claim = insert_once(conn.dialect.name, "client_jti")
            return (
                conn.execute(claim, {"issuer": issuer, "jti": jti, "expires_at": expires_at}).first()
                is not None
            )

    def record_served_base(self, base_url: str, card_key: bytes | None = None) -> None:
        """Where the service now answers, and the run's derived card-signing key when it has no
        CDS_AUDIT_KEY (StoreDown when the database fails)."""
        row = {
            "id": 1,
            "base_url": base_url,
            "recorded_at": dt.datetime.now(dt.UTC),
            "card_key": card_key.hex() if card_key else None,
        }
        with _store_down(), self._write() as conn:
            conn.execute(delete(served_base))
            conn.execute(insert(served_base), row)

    def counts(self) -> dict[str, int]:
        """Rows per table (for tests, the load test and operators' sanity checks)."""
        with self.read() as conn:
            return {
                table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (hook_call, hook_card, feedback, client_jti)
            }


# Statements built once: they run on every forwarded batch or feedback POST, and building one costs
# more than running it.
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


@contextmanager
def _store_down() -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        # The driver's own message, first line only: later lines quote the statement's parameters.
        text = str(getattr(exc, "orig", None) or exc).strip()
        first_line = text.splitlines()[0][:200] if text else "-"
        raise StoreDown(f"{type(exc).__name__}: {first_line}") from exc


def _insert_calls(conn: Connection, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Spooled call records → hook_call and hook_card rows, two statements for the whole batch
    (multi-row INSERTs: no per-row round trip, no ORM object). Their row ids by record id; a record
    already in the database is skipped."""
    inserted = conn.execute(
        insert_once(conn.dialect.name, "hook_call"),
        [
            {
                "record_id": r["rid"],
                "hook_instance": r["hi"],
                "service_id": r["sv"],
                "received_at": utc(r["at"]),
                "patient_hash": r["ph"],
                "fhir_mode": r["fm"],
                "latency_ms": r["ms"],
                "card_count": len(r["cards"]),
            }
            for r in rows
        ],
    )
    ids = {record_id: int(call_id) for call_id, record_id in inserted}
    cards = [
        {
            "call_id": ids[r["rid"]],
            "card_uuid": uuid,
            "model": model,
            "recommendation": recommendation,
            "score_min": score_min,
            "score_max": score_max,
            "risk_group": group,
            "suggestion_uuids": suggestions,
        }
        for r in rows
        if r["rid"] in ids
        for uuid, model, recommendation, score_min, score_max, group, suggestions in r["cards"]
    ]
    if cards:
        conn.execute(_INSERT_CARD, cards)
    return ids


def _insert_feedback(
    conn: Connection,
    service_id: str,
    entries: Iterable[FeedbackRecord],
    received_at: dt.datetime,
    post_id: str,
) -> FeedbackResult:
    """Each entry once; an entry already stored (same key) counts as a duplicate."""
    rows: dict[str, dict[str, Any]] = {}
    for entry in entries:  # a body repeating an entry stores it once, too
        rows.setdefault(entry.dedupe_key(service_id, post_id), _feedback_row(service_id, entry, received_at))
    outcomes = []
    insert_feedback = insert_once(conn.dialect.name, "feedback")
    for key, row in rows.items():
        if conn.execute(insert_feedback, {"dedupe_key": key, **row}).first() is not None:
            outcomes.append(row["outcome"])
    return FeedbackResult(len(outcomes), len(rows) - len(outcomes), tuple(outcomes))


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

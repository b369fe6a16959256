"""The durable store: hook-call audit, clinicians' feedback and seen client-JWT ids (issue 8).

SQLAlchemy 2 Core over SQLite (the default, one machine) or PostgreSQL (several instances). The
schema belongs to Alembic (`cds_service/migrations/`): `open_store()` brings the database to head
under a lock, so several gunicorn workers or machines starting at once migrate exactly once.

What is stored holds no direct identifier: a patient id is kept only as an HMAC keyed with
`CDS_AUDIT_KEY`; card and suggestion uuids, models, scores and recommendations are not PHI.
A clinician's free-text `userComment` is stored as sent (the report counts, never prints, it).

Concurrency: every write is one short transaction. On SQLite it starts with `BEGIN IMMEDIATE`
(WAL journal, a busy timeout) so concurrent writers queue for the lock instead of failing with
"database is locked" when a read transaction tries to upgrade; duplicates (feedback, JWT ids) are
rejected by unique constraints with `ON CONFLICT DO NOTHING`, which is atomic across processes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from cds_service.settings import Settings

log = logging.getLogger("cds_service.store")  # the name operators filter on, kept across the move

# How long a writer waits for SQLite's lock before giving up. Writes take ~1 ms, so this is only
# reached when something holds the database for a very long time (e.g. a backup).
SQLITE_BUSY_TIMEOUT_S = 30.0
# Any 64-bit constant of ours: the PostgreSQL advisory lock that serialises migrations.
_PG_MIGRATION_LOCK = 0x0C_D5_80_0C_5E_7E_00_08
_VERSION_TABLE = "cds_alembic_version"


class StoreError(Exception):
    """The store cannot be opened (bad URL, unreachable server, unwritable file): a clear message."""


# --- schema ----------------------------------------------------------------------------------------


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every dialect.

    SQLite has no time zones; storing naive UTC there (and `timestamptz` on PostgreSQL) keeps
    comparisons such as "expired before now" right on both.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware (UTC) datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
_Id = BigInteger().with_variant(Integer(), "sqlite")

# Named like the migrations name them, so `alembic revision --autogenerate` sees no spurious diff.
metadata = MetaData(
    naming_convention={"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s"}
)

# One row per answered hook call (failed calls are in the logs and metrics, not here). What a client
# sends (hookInstance, override codings, comments) is Text: PostgreSQL would refuse a long value,
# and that must not cost the audit row or the feedback.
hook_call = Table(
    "hook_call",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("hook_instance", Text(), nullable=False),
    Column("service_id", String(100), nullable=False),
    Column("received_at", UtcDateTime(), nullable=False, index=True),
    Column("patient_hash", String(64), nullable=False),
    Column("fhir_mode", String(20), nullable=False),
    Column("latency_ms", Float(), nullable=False),
    Column("card_count", Integer(), nullable=False),
)

# One row per card shown. A retried call (same hookInstance) shows cards with the same uuids,
# so card_uuid is indexed, not unique.
hook_card = Table(
    "hook_card",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("call_id", _Id, ForeignKey("hook_call.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("card_uuid", String(36), nullable=False, index=True),
    Column("model", String(64)),
    Column("recommendation", String(64)),
    Column("score_min", Integer()),
    Column("score_max", Integer()),
    Column("risk_group", String(32)),
    Column("suggestion_uuids", JSON(), nullable=False),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("service_id", String(100), nullable=False),
    Column("card_uuid", String(36), nullable=False, index=True),
    Column("outcome", String(20), nullable=False),
    Column("accepted_suggestions", JSON(), nullable=False),
    Column("override_system", Text()),
    Column("override_code", Text()),
    Column("override_display", Text()),
    Column("user_comment", Text()),
    Column("outcome_timestamp", UtcDateTime()),
    Column("received_at", UtcDateTime(), nullable=False, index=True),
    # sha256 of the entry's content: the same feedback posted twice is stored once.
    Column("dedupe_key", String(64), nullable=False, unique=True),
)

# Client-JWT ids already used (CDS Hooks 2.0: a jti must not be replayed), kept until they expire.
client_jti = Table(
    "client_jti",
    metadata,
    Column("issuer", String(1000), primary_key=True),
    Column("jti", String(500), primary_key=True),
    Column("expires_at", UtcDateTime(), nullable=False, index=True),
)


# --- records -----------------------------------------------------------------------------------------


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


# --- the store ------------------------------------------------------------------------------------------


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
        rows = {}
        for entry in entries:  # a body repeating an entry stores it once, too
            rows.setdefault(entry.dedupe_key(service_id), _feedback_row(service_id, entry, received_at))
        outcomes = []
        with self._write() as conn:
            insert_once = _insert_once(conn.dialect.name, "feedback")
            for key, row in rows.items():
                if conn.execute(insert_once, {"dedupe_key": key, **row}).first() is not None:
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
            claim = _insert_once(conn.dialect.name, "client_jti")
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


# The unique key each table's duplicates collide on.
_CONFLICT_KEYS = {"feedback": ("dedupe_key",), "client_jti": ("issuer", "jti")}


@cache
def _insert_once(dialect_name: str, table_name: str) -> Any:
    """INSERT … ON CONFLICT DO NOTHING RETURNING <primary key>: a row back means it was added.

    RETURNING rather than rowcount, which psycopg reports as -1 for these statements.
    """
    dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(dialect_name)
    if dialect is None:
        raise StoreError(f"unsupported database {dialect_name!r}: use SQLite or PostgreSQL")
    table = metadata.tables[table_name]
    return (
        dialect.insert(table)
        .on_conflict_do_nothing(index_elements=list(_CONFLICT_KEYS[table_name]))
        .returning(*table.primary_key.columns)
    )


# --- opening: engines, migrations ---------------------------------------------------------------------

_engines: dict[str, Engine] = {}
_migrated: set[str] = set()
_open_lock = threading.Lock()
_all_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def open_store(settings: Settings) -> Store:
    """The store for `settings`, its schema at head. One engine per database URL per process."""
    url = normalise_url(settings.database_url)
    key = url.render_as_string(hide_password=False)
    with _open_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _create_engine(url)
        if key not in _migrated:
            migrate(engine)
            _migrated.add(key)
            if not isinstance(engine.pool, StaticPool):  # disposing it would drop an in-memory database
                # Pooled connections must not cross a fork (gunicorn forks workers after this).
                engine.dispose()
    return Store(engine, _audit_key(settings))


def close_stores() -> None:
    """Close every pooled connection of this process (tests, orderly shutdown)."""
    with _open_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _migrated.clear()


def normalise_url(raw: str) -> URL:
    """The SQLAlchemy URL, with `postgresql://` meaning psycopg 3 (the driver we install)."""
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _create_engine(url: URL) -> Engine:
    backend = url.get_backend_name()
    if backend == "sqlite":
        engine = _sqlite_engine(url)
    elif backend == "postgresql":
        # pre_ping: a connection dropped by a server restart or a proxy is replaced, not an error.
        engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
    else:
        raise StoreError(f"unsupported database {backend!r} in CDS_DATABASE_URL: use sqlite or postgresql")
    _all_engines.add(engine)
    return engine


def _sqlite_engine(url: URL) -> Engine:
    in_memory = url.database in (None, "", ":memory:")
    if not in_memory:
        folder = Path(url.database or "").expanduser().resolve().parent
        if not folder.is_dir():
            raise StoreError(f"CDS_DATABASE_URL: the folder {folder} does not exist")
    engine = create_engine(
        url,
        # hide_parameters: SQL errors end up in logs; they must not carry values.
        hide_parameters=True,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        # An in-memory database lives in one connection: share it.
        poolclass=StaticPool if in_memory else None,
    )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # We emit BEGIN ourselves (see _sqlite_begin): pysqlite's own implicit BEGIN is deferred.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    # WAL: readers never block the writer and vice versa; FULL: a committed audit row survives a
    # power cut, not only a crash of the process (costs one fsync per commit).
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front, waiting up to the busy timeout. A deferred
    # transaction that reads and then writes can fail at once with SQLITE_BUSY under WAL
    # (its snapshot is stale) — the "database is locked" that loses rows under load.
    read_only = conn.get_execution_options().get("cds_read_only", False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def migrate(engine: Engine) -> None:
    """Bring the schema to head, once even when several processes start together.

    The lock is taken in the same transaction as the migration: on PostgreSQL an advisory
    transaction lock, on SQLite the write lock of BEGIN IMMEDIATE. Both DDL dialects are
    transactional, so a process that waited finds the schema at head and does nothing.
    """
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
            config = alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open the database of CDS_DATABASE_URL: {_reason(exc)}") from None


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "cds_service.store:migrations")
    config.set_main_option("version_table", _VERSION_TABLE)
    return config


def _reason(exc: SQLAlchemyError) -> str:
    # The driver's own message, first line only (never the SQL or its parameters).
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


@cache
def _ephemeral_key() -> bytes:
    log.warning(
        "CDS_AUDIT_KEY is not set: patient ids in the audit store are hashed with a random key "
        "for this run only, so they cannot be linked across restarts or instances"
    )
    return secrets.token_bytes(32)


def _audit_key(settings: Settings) -> bytes:
    if settings.audit_key is None:
        return _ephemeral_key()
    return settings.audit_key.get_secret_value().encode()


def _dispose_after_fork() -> None:
    # close=False: the parent still owns those sockets/files; the child just forgets them.
    for engine in list(_all_engines):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_dispose_after_fork)

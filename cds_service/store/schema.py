"""The store's tables (SQLAlchemy Core). The schema itself belongs to Alembic (`migrations/`)."""

from __future__ import annotations

import datetime as dt
from functools import cache
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects import postgresql, sqlite


class StoreError(Exception):
    """The store cannot be opened (bad URL, unreachable server, unwritable file): a clear message."""


class StoreDown(StoreError):
    """A query failed (database down, locked too long): callers outside `store/` catch this, never
    SQLAlchemy's own errors, so only `store/` knows SQL. The message is the error's class and first line."""


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
    # The record's own id, minted when it was spooled: replaying a spool segment skips what is in.
    # NULL for rows written before the spool existed (NULLs never collide).
    Column("record_id", String(32), index=True, unique=True),
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


# Where the service was last started (CDS_PUBLIC_BASE_URL, else the address it listens on): one row.
# `cds-service evaluate` on the same database links the evidence pages there, as the service does.
served_base = Table(
    "served_base",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=False),
    Column("base_url", Text(), nullable=False),
    Column("recorded_at", UtcDateTime(), nullable=False),
    # Hex of the run's derived card-signing key when CDS_AUDIT_KEY is unset (card_ids.signing_key):
    # it signs card uuids only; the secret behind the patient hashes is not derivable from it.
    Column("card_key", Text()),
)


# The unique key each table's duplicates collide on.
_CONFLICT_KEYS = {"feedback": ("dedupe_key",), "client_jti": ("issuer", "jti"), "hook_call": ("record_id",)}


@cache
def insert_once(dialect_name: str, table_name: str) -> Any:
    """INSERT … ON CONFLICT DO NOTHING RETURNING <primary key>: a row back means it was added.

    RETURNING rather than rowcount, which psycopg reports as -1 for these statements.
    """
    dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(dialect_name)
    if dialect is None:
        raise StoreError(f"unsupported database {dialect_name!r}: use SQLite or PostgreSQL")
    table = metadata.tables[table_name]
    keys = _CONFLICT_KEYS[table_name]
    returned = [*table.primary_key.columns, *(table.c[k] for k in keys if k not in table.primary_key.columns)]
    return dialect.insert(table).on_conflict_do_nothing(index_elements=list(keys)).returning(*returned)

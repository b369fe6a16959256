"""The durable store: hook-call audit, clinicians' feedback, seen client-JWT ids, where the service answers.

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

import hashlib
import logging
import os
import secrets
import threading
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool, StaticPool

from cds_service.settings import Settings

# The store's public names, importable from here as before the split.
from cds_service.store.records import (  # noqa: F401
    CallRecord,
    CardRecord,
    FeedbackRecord,
    FeedbackResult,
    cards_of,
)
from cds_service.store.repository import Store
from cds_service.store.schema import (  # noqa: F401
    StoreError,
    client_jti,
    feedback,
    hook_call,
    hook_card,
    metadata,
    served_base,
)

log = logging.getLogger("cds_service.store")  # the name operators filter on, kept across the move

# How long a writer waits for SQLite's lock before giving up. Writes take ~1 ms, so this is only
# reached when something holds the database for a very long time (e.g. a backup).
SQLITE_BUSY_TIMEOUT_S = 30.0
# Any 64-bit constant of ours: the PostgreSQL advisory lock that serialises migrations.
_PG_MIGRATION_LOCK = 0x0C_D5_80_0C_5E_7E_00_08
_VERSION_TABLE = "cds_alembic_version"


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
    secret = _audit_key(settings)
    return Store(
        engine,
        secret,
        spool_dir=spool_folder(settings, url),
        spool_fsync=settings.audit_fsync,
        spool_sync_before_answer=settings.audit_sync_before_answer,
        spool_max_bytes=settings.audit_spool_max_bytes,
        # Without CDS_AUDIT_KEY, the run's random key: `serve` makes it in the master, so every worker
        # of this run recognises every other's cards; another instance's (or an earlier run's) cards
        # are looked up in the database instead.
        card_key=secret,
    )


def spool_folder(settings: Settings, url: URL) -> Path | None:
    """The audit spool of this database: one subfolder per database, so that two databases never
    forward each other's records even when they share CDS_AUDIT_SPOOL_DIR."""
    in_memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
    if settings.audit_spool_dir:
        base = Path(settings.audit_spool_dir).expanduser()
    elif in_memory:
        return None  # nothing durable to forward to: the trail uses a private folder
    elif url.get_backend_name() == "sqlite":
        base = Path(url.database or "").expanduser().resolve().parent / "cds-audit-spool"
    else:
        base = Path.cwd() / "cds-audit-spool"
    if url.get_backend_name() == "sqlite" and not in_memory:
        identity = "sqlite:" + str(Path(url.database or "").expanduser().resolve())
    else:
        identity = url.render_as_string(hide_password=True)
    return base.resolve() / hashlib.sha256(identity.encode()).hexdigest()[:16]


def close_stores() -> None:
    """Close every pooled connection of this process (tests, orderly shutdown)."""
    with _open_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _migrated.clear()


@dataclass(frozen=True)
class ServedBase:
    """What the last `serve` or `demo` on a database recorded there when it started."""

    base_url: str
    card_key: bytes | None  # its derived card-signing key, when it ran without CDS_AUDIT_KEY


def recorded_served_base(settings: Settings) -> ServedBase | None:
    """What the last `serve` or `demo` on this database recorded, read without creating, migrating
    or writing anything; None when there is no such database, no record, or it cannot be read."""
    try:
        url = normalise_url(settings.database_url)
    except (SQLAlchemyError, ValueError):
        return None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database in (None, "", ":memory:") or not Path(url.database or "").expanduser().is_file():
            return None
        connect_args: dict[str, Any] = {"timeout": 2.0}
    elif backend == "postgresql":
        connect_args = {"connect_timeout": 3}
    else:
        return None
    engine = create_engine(url, hide_parameters=True, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(served_base).where(served_base.c.id == 1)).mappings().first()
            if row is None:
                return None
            base, key = row["base_url"], row.get("card_key")
    except SQLAlchemyError:  # no such table (an older schema), locked, down: the caller's default
        return None
    finally:
        engine.dispose()
    if not isinstance(base, str) or not base:
        return None
    try:
        card_key = bytes.fromhex(key) if isinstance(key, str) and key else None
    except ValueError:
        card_key = None
    return ServedBase(base, card_key)


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
        "CDS_AUDIT_KEY is not set: a random key for this run only hashes patient ids (they cannot be "
        "linked across restarts or instances) and signs card uuids (feedback for another instance's "
        "or an earlier run's cards is checked against the database: refused while it is down, 422 "
        "when the card's audit row is late); set the same CDS_AUDIT_KEY on every instance"
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

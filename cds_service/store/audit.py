"""The hook-call audit trail and the feedback posts: spooled before the answer, forwarded behind it.

Each answered call becomes one audit record (its cards, model, score, recommendation, latency, the
keyed hash of the patient id). `record` appends it to this process's local spool and returns once
it is written (the spool's syncer fsyncs it right behind; with CDS_AUDIT_SYNC_BEFORE_ANSWER, once
it is fsync'd — group commit either way: one sync covers every record written meanwhile); the
route sends the answer only then. A forwarder thread per process copies what has spooled up into the database,
many records per transaction, a fraction of a second behind, and removes what the database holds.

So a process killed outright (SIGKILL, out of memory) loses no record it answered: its segment
stays in the spool folder, and any process using the folder adopts and forwards it within seconds
(the same happens on the next start). A database that is down or locked holds records up in the
spool (counted by the `cds_audit_spool_records` gauge), and they are forwarded when it is back.
Feedback takes the same path, so it is never refused because the database is busy or down.

What the request process pays: building the record, an orjson line, a write() (and, syncing before
the answer, its share of one fdatasync); the forwarder's database work is batched (two multi-row INSERTs per batch, no ORM).
If the spool itself cannot be written (disk full), or holds its cap (CDS_AUDIT_SPOOL_MAX_BYTES: a
database outage of hours), the call is answered 503: an answer the audit trail cannot keep is not
given.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from cds_service import card_ids
from cds_service.errors import ServiceError
from cds_service.pipeline import Outcome
from cds_service.store.records import (
    CallRecord,
    FeedbackRecord,
    card_record,
    new_record_id,
    spooled_call,
    spooled_feedback,
)
from cds_service.store.repository import Store
from cds_service.store.spool import Segment, Spool, SpoolError, SpoolFull
from cds_service.telemetry import metrics

log = logging.getLogger("cds_service.audit")  # the name operators filter on, kept across the move

# How long records gather in the spool before the forwarder takes them: the larger the batch, the
# less database work per record; what waits is already durable.
FORWARD_INTERVAL_S = 0.2
# How often a forwarder looks for segments whose process died.
ADOPT_EVERY_S = 2.0
# Back-off between attempts while the database refuses the records.
RETRY_MAX_S = 5.0
# An idle forwarder thread exits (after a last look for orphans); the next record starts a new one.
IDLE_EXIT_S = 5.0
# Retry-After of a call refused because the spool is full (the database has been away for hours).
FULL_RETRY_AFTER_S = 30

_trails: weakref.WeakSet[AuditTrail] = weakref.WeakSet()


class AuditUnavailable(ServiceError):
    """The local audit spool cannot be written (disk full, I/O error): no answer without its record."""

    status = 503
    issue_code = "transient"

    def __init__(self, diagnostics: str, *, retry_after: int | None = None) -> None:
        super().__init__(diagnostics)
        # Set when the spool is full: logged once per episode (not per call), retried by the client.
        self.retry_after = retry_after


class AuditTrail:
    """Spools audit records and feedback durably; forwards them to the store on a background thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        card_ids.configure(store.card_key)  # the cards this process renders are signed with it
        folder = store.spool_dir
        if folder is None:  # an in-memory database: a private folder, gone with the process
            folder = Path(tempfile.mkdtemp(prefix="cds-audit-spool-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        self.spool = Spool(
            folder,
            fsync=store.spool_fsync,
            before_return=store.spool_sync_before_answer,
            max_bytes=store.spool_max_bytes,
        )
        self._forward_lock = threading.Lock()
        self._held: list[Segment] = []  # sealed or adopted, not yet in the database (oldest first)
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._wake = threading.Event()
        self._last_adopt = 0.0
        self._failing_since: float | None = None
        self._full_since: float | None = None  # the spool at its cap: calls refused since then
        self._refused = 0
        self._published_at = 0.0
        _trails.add(self)

    # --- the request side -------------------------------------------------------------------------

    def record(self, service_id: str, outcome: Outcome, latency_s: float) -> None:
        """Spool the audit of one answered hook call; returns once it is written (see Spool).

        Raises AuditUnavailable (503) only when the spool cannot take it.
        """
        try:
            cards = tuple(card_record(c.uuid, c.assessment, c.suggestion_uuids) for c in outcome.minted.cards)
            metrics.observe_answer(service_id, outcome, cards)
            call = CallRecord(
                hook_instance=outcome.hook_instance,
                service_id=service_id,
                patient_id=outcome.patient_id,
                received_at=dt.datetime.now(dt.UTC),
                fhir_mode=outcome.source.fhir_mode,
                latency_ms=round(latency_s * 1000, 3),
                cards=cards,
            )
        except Exception as exc:  # a bug in building the record: log it and answer anyway
            _lost(service_id, 1, exc)
            return
        self.submit(call)

    def submit(self, call: CallRecord) -> None:
        """Spool one audit record (durably); AuditUnavailable when the spool cannot take it."""
        self._append(spooled_call(call, self.store.patient_hash(call.patient_id)), call.service_id)

    def record_feedback(self, service_id: str, entries: Iterable[FeedbackRecord]) -> None:
        """Spool one feedback POST (durably); stored in the database by the forwarder, each entry once."""
        post = spooled_feedback(service_id, entries, dt.datetime.now(dt.UTC), new_record_id())
        self._append(post, service_id)

    def _append(self, record: dict[str, Any], service_id: str) -> None:
        try:
            self.spool.append(orjson.dumps(record) + b"\n")
        except SpoolFull:
            self._spool_full()
            raise AuditUnavailable(
                "the audit trail is full and cannot record this call now; nothing was kept, try again later",
                retry_after=FULL_RETRY_AFTER_S,
            ) from None
        except (SpoolError, TypeError) as exc:
            _lost(service_id, 1, exc)
            self._ensure_forwarder()  # it may free the disk
            raise AuditUnavailable(
                "the audit trail cannot record this call now; nothing was kept, try again later"
            ) from None
        if self._full_since is not None and self.spool.size < 0.9 * (self.spool.max_bytes or 0):
            self._spool_has_room()  # drained, not merely room for one small record
        if self.spool.measured_at != self._published_at:  # about once a second
            self._publish_size()
        self._ensure_forwarder()

    def _publish_size(self) -> None:
        self._published_at = self.spool.measured_at
        metrics.audit_spool_bytes(self.spool.size, self.spool.max_bytes)

    def _spool_full(self) -> None:
        # Logged once per episode (it may last as long as the database outage), counted every time.
        metrics.store_error("spool_full")
        self._publish_size()
        self._refused += 1
        if self._full_since is None:
            self._full_since = time.monotonic()
            log.error(
                "audit: the spool %s is full (%d bytes, CDS_AUDIT_SPOOL_MAX_BYTES %d): the database has "
                "not taken records for a long time; hook calls and feedback are answered 503 until it does",
                self.spool.folder,
                self.spool.size,
                self.spool.max_bytes,
            )
        # Orphaned segments of a dead worker may be what fills it: a forwarder must be running to
        # adopt them even when this process has nothing of its own to forward.
        self._ensure_forwarder()

    def _spool_has_room(self) -> None:
        since, self._full_since = self._full_since, None
        if since is not None:
            log.warning(
                "audit: the spool takes records again after %.0f s; %d call(s) were answered 503 meanwhile",
                time.monotonic() - since,
                self._refused,
            )
            self._refused = 0

    # --- forwarding -------------------------------------------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Forward everything spooled so far (and any orphaned segment) now; False if the database
        did not take it all (it stays spooled) or the forwarder stayed busy beyond `timeout`."""
        if not self._forward_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            return self._forward(adopt=True)
        finally:
            self._forward_lock.release()

    @property
    def pending(self) -> int:
        """Records of this process (and adopted ones) in the spool, not yet in the database."""
        held = sum(max(s.records, 0) for s in list(self._held))
        active = self.spool._active
        return held + (active.records if active is not None else 0)

    def _ensure_forwarder(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cds-audit-forwarder", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        idle_since = time.monotonic()
        delay = FORWARD_INTERVAL_S
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            now = time.monotonic()
            with self._forward_lock:
                ok = self._forward(adopt=now - self._last_adopt >= ADOPT_EVERY_S)
                busy = bool(self._held) or self.pending > 0
            delay = FORWARD_INTERVAL_S if ok else min(RETRY_MAX_S, max(delay * 2, 0.5))
            if busy or not ok:
                idle_since = now
            elif now - idle_since >= IDLE_EXIT_S:
                with self._thread_lock:
                    self._thread = None
                return

    def _forward(self, *, adopt: bool) -> bool:
        """One pass (the forward lock held): seal the active segment, adopt orphans, write all held."""
        sealed = self.spool.seal()
        if sealed is not None:
            self._held.append(sealed)
            self.spool.prepare()  # off the answers' path
        if adopt:
            self._last_adopt = time.monotonic()
            self._held.extend(self.spool.adopt({s.path for s in self._held}))
        ok = True
        while self._held:
            segment = self._held[0]
            if not self._write(segment):
                ok = False
                break
            self._held.pop(0)
            self.spool.discard(segment)
        metrics.audit_spool_records(self.pending)
        self.spool.measure()
        self._publish_size()
        return ok

    def _write(self, segment: Segment) -> bool:
        """The segment's records into the database (True), or left in the spool (False)."""
        records = segment.read()
        segment.records = len(records)
        try:
            results = self.store.write_spooled(records)
        except (DataError, IntegrityError):
            # A record the database refuses (a value it cannot store) must not hold back the others.
            results = []
            for record in records:
                try:
                    results += self.store.write_spooled([record])
                except (DataError, IntegrityError) as exc:
                    _lost(str(record.get("sv", "-")), 1, exc)
                except SQLAlchemyError as exc:
                    return self._unavailable(exc)
        except SQLAlchemyError as exc:
            return self._unavailable(exc)
        if self._failing_since is not None:
            log.warning(
                "audit: the database takes records again after %.0f s; spooled records forwarded",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        for service_id, result in results:
            metrics.observe_feedback(service_id, result)
        return True

    def _unavailable(self, exc: SQLAlchemyError) -> bool:
        # Database down, locked too long, a table missing: the records wait in the spool.
        metrics.store_error("record_call")
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "audit: the database refuses records (%s: %s); they are kept in the spool %s and "
                "forwarded when it is back",
                type(exc).__name__,
                _first_line(exc),
                self.spool.folder,
            )
        return False

    def _after_fork(self) -> None:
        # The child must not write the parent's segments: it starts with none, and no thread.
        held, self._held = self._held, []
        for segment in held:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
        self.spool.after_fork()
        self._forward_lock = threading.Lock()
        self._thread_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None


def close_all(timeout: float = 10.0) -> None:
    """Forward every spooled record of this process now (orderly shutdown, interpreter exit)."""
    for trail in list(_trails):
        if not trail.flush(timeout):
            log.error(
                "audit: %d record(s) left in the spool %s; forwarded when the database is back "
                "(by the next process using this folder)",
                trail.pending,
                trail.spool.folder,
            )
        for segment in trail._held:  # unlock them: another process may forward them
            trail.spool.release(segment)
        trail._held = []


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else "-"


def _lost(service_id: str, count: int, exc: BaseException) -> None:
    metrics.store_error("record_call", count)
    # The first line of the driver's message only (hide_parameters keeps values out of it).
    log.error(
        "could not audit %d %s hook call(s): %s: %s", count, service_id, type(exc).__name__, _first_line(exc)
    )


def _reset_after_fork() -> None:
    for trail in list(_trails):
        trail._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
# Daemon threads still run while atexit handlers do: the spool is forwarded before the process ends.
atexit.register(close_all)

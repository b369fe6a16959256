"""The hook-call audit trail, written behind the answer.

Each answered call becomes one audit record (its cards, model, score, recommendation, latency).
Committing it costs an fsync and a millisecond of SQLAlchemy work, and a clinician opening a chart
should not wait for either, so the route only queues the record; one writer thread per process
commits what has queued up, many records per transaction. A record is on disk a few milliseconds
after its answer is sent.

What that trades: an orderly shutdown (gunicorn's SIGTERM, Ctrl-C, `sys.exit`) writes every queued
record first (`close_all`, also at interpreter exit); a process killed outright (SIGKILL, out of
memory, power cut) loses the records of its last few milliseconds, never a committed one. The
answer never depends on the audit: a store that is down or too slow costs records (logged, counted
in `cds_store_errors_total`), not answers.

Reading one's own writes: feedback checks its card against the store, so `flush()` first waits
for this process's queue; a card answered by another worker a moment ago is waited for by
`feedback.receive_feedback`.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import OperationalError

from cds_service.pipeline import Outcome
from cds_service.store.records import CallRecord, cards_of
from cds_service.store.repository import Store
from cds_service.telemetry import metrics

log = logging.getLogger("cds_service.audit")  # the name operators filter on, kept across the move

# Records waiting beyond this are dropped (and counted) instead of growing memory without bound
# while the database is unreachable: at 100 calls/s that is over a minute and a half of outage.
MAX_PENDING = 10_000
# Records per transaction: enough to keep up with a burst, small enough to hold the write lock briefly.
BATCH = 200
# An idle writer thread exits; the next record starts a new one (so forks and tests leave none behind).
IDLE_EXIT_S = 5.0

_trails: weakref.WeakSet[AuditTrail] = weakref.WeakSet()


class AuditTrail:
    """Queues audit records and commits them on a background thread of this process."""

    def __init__(self, store: Store, *, max_pending: int = MAX_PENDING) -> None:
        self.store = store
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: deque[CallRecord] = deque()
        self._queued = 0  # records accepted since start
        self._settled = 0  # of those, written or given up on
        self._thread: threading.Thread | None = None
        _trails.add(self)

    def record(self, body: Mapping[str, Any], service_id: str, outcome: Outcome, latency_s: float) -> None:
        """Queue the audit of one answered hook call. Never raises: the answer matters more.

        `body` has been validated by the engine already (hookInstance and context.patientId exist).
        """
        try:
            cards = cards_of(outcome.answer)
            metrics.observe_answer(service_id, outcome, cards)
            call = CallRecord(
                hook_instance=body["hookInstance"],
                service_id=service_id,
                patient_id=body["context"]["patientId"],
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
        """Queue one audit record for the writer thread; dropped (logged, counted) when the queue is full."""
        with self._cond:
            if len(self._pending) >= self._max_pending:
                full = True
            else:
                full = False
                self._pending.append(call)
                self._queued += 1
                self._ensure_writer()
                self._cond.notify_all()
        if full:
            _lost(call.service_id, 1, OverflowError(f"{self._max_pending} audit records already waiting"))

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every record queued so far is written (or given up on); False on timeout."""
        with self._cond:
            target = self._queued
            return self._cond.wait_for(lambda: self._settled >= target, timeout)

    @property
    def pending(self) -> int:
        with self._cond:
            return self._queued - self._settled

    def _ensure_writer(self) -> None:
        # Called with the lock held. A thread started before a fork does not exist in the child.
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="cds-audit-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending, IDLE_EXIT_S):
                    self._thread = None
                    return
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            self._write(batch)
            with self._cond:
                self._settled += len(batch)
                self._cond.notify_all()

    def _write(self, batch: list[CallRecord]) -> None:
        try:
            self.store.record_calls(batch)
        except OperationalError as exc:
            # Database down, locked too long, disk full: the records are lost, the answers were not.
            # Retrying them one by one would only wait on the same database again.
            _lost(batch[0].service_id, len(batch), exc)
        except Exception:
            # A record the database refuses (say a NUL byte PostgreSQL will not store) must not
            # cost the other records of its batch theirs.
            for call in batch:
                try:
                    self.store.record_calls([call])
                except Exception as exc:
                    _lost(call.service_id, 1, exc)

    def _after_fork(self) -> None:
        # The child starts with the parent's queue copied but no writer thread, and a lock that may
        # have been held at the fork: start clean (the parent still owns and writes those records).
        self._cond = threading.Condition()
        self._pending = deque()
        self._queued = self._settled = 0
        self._thread = None


def close_all(timeout: float = 10.0) -> None:
    """Write every queued record of this process (orderly shutdown, interpreter exit)."""
    for trail in list(_trails):
        if not trail.flush(timeout):
            log.error("audit: %d record(s) not written before shutdown", trail.pending)


def _lost(service_id: str, count: int, exc: BaseException) -> None:
    metrics.store_error("record_call", count)
    # The first line of the driver's message only (hide_parameters keeps values out of it).
    text = str(getattr(exc, "orig", None) or exc).strip()
    log.error(
        "could not audit %d %s hook call(s): %s: %s",
        count,
        service_id,
        type(exc).__name__,
        text.splitlines()[0] if text else "-",
    )


def _reset_after_fork() -> None:
    for trail in list(_trails):
        trail._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
# Daemon threads still run while atexit handlers do: the queue is written before the process ends.
atexit.register(close_all)

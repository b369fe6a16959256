"""What one hook call may spend on FHIR reads, and what the process may spend on all of them.

A call has one deadline (`CDS_FHIR_TIMEOUT_S` from its first fetch), one byte budget (decompressed
bytes, every search and page) and one entry budget; when the deadline passes, the sockets it is still
using are shut down. The process has a fixed number of fetch threads: a call that finds none free is answered 503
with Retry-After instead of starting more threads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import requests

from cds_service.errors import FetchBusy
from cds_service.fetch.session import Fail, SocketTracker, make_session
from cds_service.settings import Settings

T = TypeVar("T")

# How long a call waits for free fetch threads before it is answered 503.
_SLOT_WAIT_S = 0.5


class _Slots:
    """A counting semaphore that takes several units at once (all or none)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._cond = threading.Condition()

    def take(self, wanted: int, least: int, timeout: float) -> int:
        end = time.monotonic() + timeout
        with self._cond:
            while self.free < least:
                left = end - time.monotonic()
                if left <= 0:
                    return 0
                self._cond.wait(left)
            got = min(wanted, self.free)
            self.free -= got
            return got

    def give(self, n: int) -> None:
        with self._cond:
            self.free += n
            self._cond.notify_all()


_slots_lock = threading.Lock()
_slots: tuple[int, _Slots] | None = None  # (pid, slots): a forked worker starts with its own


def process_slots(settings: Settings) -> _Slots:
    global _slots
    with _slots_lock:
        if _slots is None or _slots[0] != os.getpid() or _slots[1].total != settings.fhir_fetch_threads:
            _slots = (os.getpid(), _Slots(settings.fhir_fetch_threads))
        return _slots[1]


class CallBudget:
    """One hook call's deadline, byte and entry budgets, and the sockets to close at its end."""

    def __init__(self, settings: Settings, deadline: float | None = None) -> None:
        self.settings = settings
        self.deadline = deadline if deadline is not None else time.monotonic() + settings.fhir_timeout_s
        self.bytes_left = settings.fhir_max_call_bytes
        self.entries_left = settings.fhir_max_call_entries
        self.abort = threading.Event()  # the call is over (answered, or its budget is spent)
        self.tracker = SocketTracker()
        self._session: requests.Session | None = None
        self._lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        """Made on first use: a call answered from its prefetch never builds one. Its connections
        are the process's kept ones (fetch/session.py); the call's own are those lent to it."""
        with self._lock:
            if self._session is None:
                self._session = make_session(pooled=True)
            return self._session

    def remaining(self) -> float:
        if self.abort.is_set():
            raise Fail("timeout", "timeout", detail="the call ended")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Fail("timeout", "timeout", detail="the call's time budget ended")
        return left

    def spend_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_left -= n
            spent = self.bytes_left < 0
        if spent:
            self.abort.set()
            raise Fail("too large", "too-long", detail="the call's byte budget", fatal=True)

    def spend_entries(self, n: int) -> None:
        with self._lock:
            self.entries_left -= n
            spent = self.entries_left < 0
        if spent:
            self.abort.set()
            raise Fail("too large", "too-long", detail="the call's entry budget", fatal=True)

    def close(self) -> None:
        """End the call: wake and close every connection it is still using, whatever it is doing
        (the connections it gave back stay in the process's pool, for the next call)."""
        self.abort.set()
        self.tracker.close_all()

    def __enter__(self) -> CallBudget:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Workers:
    """Fetch threads for one group of searches, counted against the process's fetch threads."""

    def __init__(self, budget: CallBudget, chains: int, extra: int) -> None:
        slots = process_slots(budget.settings)
        # Every chain needs a thread, plus one at least for pages fetched side by side, so a chain
        # waiting for its pages never waits for a thread another chain holds.
        got = slots.take(chains + extra, chains + 1, _SLOT_WAIT_S)
        if not got:
            raise FetchBusy("too many FHIR reads in progress; retry shortly", retry_after=1)
        self._slots, self._held, self.size = slots, got, got
        self._executor = ThreadPoolExecutor(max_workers=got, thread_name_prefix="fhir")
        self._pending = 0
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            self._pending += 1
        future = self._executor.submit(fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Future[Any]) -> None:
        with self._lock:
            self._pending -= 1
            release = self._closed and self._pending == 0 and self._held
            if release:
                self._held = 0
        if release:
            self._slots.give(release)

    def close(self) -> None:
        """No more work; the threads end once their current exchange does (its socket is closed at
        the call's deadline at the latest), and their slots go back to the process then."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._closed = True
            release = self._pending == 0 and self._held
            if release:
                self._held = 0
        if release:
            self._slots.give(release)

"""The HTTP transport: one pooled requests Session per process, its retry policy, and how a
transport error becomes one search's failure (a generic cause, never the error's own text)."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextvars import ContextVar
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# A retry is pointless unless the next attempt still has this long to run.
MIN_ATTEMPT_S = 0.05

# The deadline of the fetch running in this thread, read by the retry policy (shared, immutable
# Retry objects cannot carry per-call state; a context variable can).
DEADLINE: ContextVar[float | None] = ContextVar("fhir_deadline", default=None)


class Fail(Exception):
    """One search's failure, turned into a FetchFailed by the caller's thread."""

    def __init__(self, reason: str, code: str = "incomplete", *, abandoned: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.abandoned = abandoned  # stopped because another search failed: not a cause itself


class RetryBudgetExhausted(Exception):
    def __init__(self, status: int | None, wait_s: float) -> None:
        super().__init__(status, wait_s)
        self.status = status
        self.wait_s = wait_s


class _BudgetRetry(Retry):
    """urllib3's Retry, except that it gives up instead of sleeping past the call's deadline."""

    # 413 would be retried on a Retry-After by default; a too-large answer will not shrink.
    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def sleep(self, response: Any = None) -> None:
        wait_s: float | None = None
        if response is not None and self.respect_retry_after_header:
            try:
                wait_s = self.get_retry_after(response)
            except urllib3.exceptions.InvalidHeader:
                wait_s = None
        if not wait_s:
            wait_s = self.get_backoff_time()
        deadline = DEADLINE.get()
        if deadline is not None and time.monotonic() + wait_s + MIN_ATTEMPT_S > deadline:
            raise RetryBudgetExhausted(getattr(response, "status", None), wait_s)
        if wait_s > 0:
            time.sleep(wait_s)


def make_session(pool_maxsize: int = 32) -> requests.Session:
    """A pooled Session with the retry policy; thread-safe for our GET-only use."""
    retry = _BudgetRetry(
        total=3,
        connect=0,  # a refused connection should fail fast with a clear 412, not back off
        read=0,
        other=0,
        status=3,
        backoff_factor=0.1,
        backoff_max=2.0,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,  # we want the final response to report its status
    )
    adapter = HTTPAdapter(pool_connections=8, pool_maxsize=pool_maxsize, max_retries=retry)
    session = requests.Session()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # One session serves many patients and tokens: a cookie from one call must not ride on another.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    session.headers.update({"Accept": FHIR_JSON, "User-Agent": "crc-cds-service"})
    return session


@functools.cache
def shared_session() -> requests.Session:
    """The process-wide pooled session (connections are reused across hook calls)."""
    return make_session()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (requests -> urllib3 -> socket)."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(
            [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        )


def transport_failure(exc: requests.RequestException, budget_s: float) -> Fail:
    causes = list(_causes(exc))
    # Refusal and DNS first: urllib3's NewConnectionError subclasses its ConnectTimeoutError.
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return Fail("connection refused (is the FHIR server running at fhirServer?)", "exception")
    if any(isinstance(c, urllib3.exceptions.NameResolutionError) for c in causes):
        return Fail("the FHIR server's host name cannot be resolved", "exception")
    if isinstance(exc, requests.Timeout) or any(
        isinstance(c, TimeoutError | urllib3.exceptions.TimeoutError)
        and not isinstance(c, urllib3.exceptions.NewConnectionError)
        for c in causes
    ):
        return Fail(f"the FHIR server did not answer within the {budget_s:g} s time budget", "timeout")
    if isinstance(exc, requests.exceptions.SSLError):
        return Fail("TLS error talking to the FHIR server (certificate not trusted?)", "exception")
    if isinstance(exc, requests.ConnectionError):
        return Fail("the connection to the FHIR server failed or was dropped", "exception")
    # Only the class name: some requests errors quote header values, i.e. the token.
    return Fail(f"request failed ({type(exc).__name__})", "exception")

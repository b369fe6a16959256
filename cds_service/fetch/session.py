"""The HTTP transport: connections to each FHIR origin kept and reused across calls (a bounded pool
per origin, per process), the address rule checked on every new connection, each call's deadline
enforced on the sockets it is using, and how a transport error becomes a generic cause.

A connection is lent to one request at a time. While it is lent it registers with the calling
fetch's `SocketTracker` (a thread-local set around each request); when the call's time budget ends,
`SocketTracker.close_all` shuts down every socket the call is still using, so a peer that trickles
its answer a byte at a time cannot keep a thread reading after the call was answered (a `requests`
timeout bounds each read, not the whole answer). Only a connection whose answer was read to the end
goes back to the pool; any other is closed. Pools are keyed by origin (scheme, host, port), and the
bearer token is a header of each request, so a pooled connection carries nothing from one call to
the next.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from collections.abc import Iterator
from http.cookiejar import DefaultCookiePolicy
from types import TracebackType
from typing import Any, Self

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from cds_service.fetch.policy import forbidden_address

FHIR_JSON = "application/fhir+json"


class Fail(Exception):
    """One search's failure. `cause` is generic and safe to show to the EHR (service contract:
    connection failed, timeout, HTTP <status>, not FHIR, rate-limited, too large, refused);
    `detail` is for the operator's log and never holds upstream text."""

    def __init__(
        self,
        cause: str,
        code: str = "incomplete",
        *,
        detail: str = "",
        fatal: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.code = code
        self.detail = detail
        self.fatal = fatal  # ends the whole call (its budget is spent), optional search or not
        self.timed_out = timed_out or cause == "timeout"  # an optional search just ran out of time


class AddressRefused(OSError):
    """The FHIR server's name resolved to a link-local or cloud-metadata address."""


class SocketTracker:
    """The connections one fetch is using, so that they can all be closed when its budget ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[int, Any] = {}
        self.closed = False

    def add(self, conn: Any) -> None:
        with self._lock:
            closed = self.closed
            if not closed:
                self._connections[id(conn)] = conn
        if closed:
            _shutdown(conn)

    def discard(self, conn: Any) -> None:
        with self._lock:
            self._connections.pop(id(conn), None)

    def close_all(self) -> None:
        # Under the lock: a connection given back meanwhile (discard waits) is never shut down
        # after another call has borrowed it from the pool.
        with self._lock:
            self.closed = True
            for conn in self._connections.values():
                _shutdown(conn)
            self._connections = {}


_calling = threading.local()


def current_tracker() -> SocketTracker | None:
    """The tracker of the fetch this thread is making a request for, if any."""
    return getattr(_calling, "tracker", None)


@contextlib.contextmanager
def calling_for(tracker: SocketTracker) -> Iterator[None]:
    """Connections lent to this thread's requests meanwhile register with `tracker`."""
    previous = current_tracker()
    _calling.tracker = tracker
    try:
        yield
    finally:
        _calling.tracker = previous


def _shutdown(conn: Any) -> None:
    # shutdown() wakes a thread blocked in recv() on this socket at once; close() alone may not.
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):  # closing a half-dead connection from another thread
        conn.close()


def _checked(sock: socket.socket) -> socket.socket:
    """The address rule, on the address actually connected to (after DNS, so no rebinding trick)."""
    try:
        peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
    except (OSError, ValueError):
        return sock
    if forbidden_address(peer):
        sock.close()
        raise AddressRefused("the FHIR server resolves to a link-local or metadata address")
    return sock


def _connected(sock: socket.socket) -> socket.socket:
    sock = _checked(sock)
    tracker = current_tracker()
    if tracker is not None and tracker.closed:
        # The call ended while this connection was being made: close_all could not reach it.
        sock.close()
        raise TimeoutError("the call's time budget ended while connecting")
    return sock


class _Connection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _connected(super()._new_conn())


class _TLSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _connected(super()._new_conn())


class _Lending:
    """Pool behaviour: a connection lent out registers with the borrowing fetch's tracker, and
    leaves it when it comes back."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        tracker = current_tracker()
        if tracker is not None:
            if tracker.closed:
                super()._put_conn(conn)  # type: ignore[misc]  # still good: keep it for others
                raise TimeoutError("the call's time budget ended")
            conn.cds_tracker = tracker
            tracker.add(conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        tracker = getattr(conn, "cds_tracker", None)
        if tracker is not None:
            tracker.discard(conn)
            conn.cds_tracker = None
        super()._put_conn(conn)  # type: ignore[misc]


class _Pool(_Lending, HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(_Lending, HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}


class _DroppedOnly(Retry):
    """A read retry only for a connection the server dropped: a server too slow to answer within
    the call's budget is not asked again."""

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        if isinstance(error, urllib3.exceptions.ReadTimeoutError):
            raise error
        return super().increment(method, url, response, error, _pool, _stacktrace)


def _adapter(origins: int, per_origin: int) -> _Adapter:
    # One retry, for GET only, when a pooled keep-alive connection turns out to have been closed by
    # the server as it was reused. Status retries (429/503) are ours: they must respect the budget.
    retry = _DroppedOnly(
        total=1,
        connect=0,
        read=1,
        other=0,
        status=0,
        redirect=0,
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=False,
        raise_on_status=False,
    )
    return _Adapter(pool_connections=origins, pool_maxsize=per_origin, max_retries=retry)


# The process's kept connections: at most this many FHIR origins (least recently used dropped, its
# connections closed), and this many idle connections to each (more may be open at once; the extra
# ones are closed when they come back).
POOL_ORIGINS = 8
POOL_PER_ORIGIN = 16
_shared_lock = threading.Lock()
_shared: tuple[int, _Adapter] | None = None  # (pid, adapter): a forked worker starts with its own


def shared_adapter() -> _Adapter:
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), _adapter(POOL_ORIGINS, POOL_PER_ORIGIN))
        return _shared[1]


def close_pooled() -> None:
    """Close every kept connection (tests; a worker about to exit)."""
    global _shared
    with _shared_lock:
        if _shared is not None and _shared[0] == os.getpid():
            _shared[1].close()
        _shared = None


def make_session(*, pooled: bool = False) -> requests.Session:
    """A Session for GETs to FHIR servers: on the process's kept connections when `pooled` (never
    close() such a Session: that would close them for every call), else on connections of its own."""
    adapter = shared_adapter() if pooled else _adapter(4, 16)
    session = requests.Session()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # No cookie from one FHIR server answer may ride on another request.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    session.trust_env = False  # no proxy or .netrc credentials from the environment
    session.headers.update(
        {"Accept": FHIR_JSON, "User-Agent": "crc-cds-service", "Accept-Encoding": "gzip, deflate"}
    )
    return session


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


def transport_failure(exc: BaseException, *, past_deadline: bool, answered: bool) -> Fail:
    """A generic cause for the EHR; the kind of failure (exception classes only) for the log.

    Before the server has answered, a closed port, a peer that does not speak HTTP, a TLS failure
    and a silent peer all read "connection failed": the service must not become a port scanner for
    whoever can name a fhirServer. Once it has answered, running out of time is "timeout". Either
    way `timed_out` tells an optional search that simply ran out of time (no data of that kind).
    """
    causes = list(_causes(exc))
    if any(isinstance(c, AddressRefused) for c in causes):
        return Fail("refused (link-local or metadata address)", "security", detail="address policy")
    detail = "/".join(sorted({type(c).__name__ for c in causes}))[:200]
    timed_out = past_deadline or any(
        isinstance(c, TimeoutError | urllib3.exceptions.TimeoutError | requests.Timeout)
        and not isinstance(c, urllib3.exceptions.NewConnectionError)
        for c in causes
    )
    if answered and timed_out:
        return Fail("timeout", "timeout", detail=detail, timed_out=True)
    return Fail("connection failed", "exception", detail=detail, timed_out=timed_out)

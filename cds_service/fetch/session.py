"""The HTTP transport: a requests Session per fetch whose sockets the fetch can close, the address
rule checked on every connection, and how a transport error becomes a generic cause.

Each fetch (all searches of one hook call) gets its own Session whose connections register with a
`SocketTracker`. When the call's time budget ends, `SocketTracker.close_all` shuts every one of them
down, so a peer that trickles its answer a byte at a time cannot keep a thread reading after the
call was answered (a `requests` timeout bounds each read, not the whole answer).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.cookiejar import DefaultCookiePolicy
from typing import Any

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
    """The connections one fetch opened, so that they can all be closed when its budget ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: list[Any] = []
        self.closed = False

    def add(self, conn: Any) -> None:
        with self._lock:
            closed = self.closed
            if not closed:
                self._connections.append(conn)
        if closed:
            _shutdown(conn)

    def close_all(self) -> None:
        with self._lock:
            self.closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            _shutdown(conn)


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


def _connected(sock: socket.socket, tracker: SocketTracker | None) -> socket.socket:
    sock = _checked(sock)
    if tracker is not None and tracker.closed:
        # The call ended while this connection was being made: close_all could not reach it.
        sock.close()
        raise TimeoutError("the call's time budget ended while connecting")
    return sock


class _Connection(HTTPConnection):
    tracker: SocketTracker | None = None

    def _new_conn(self) -> socket.socket:
        return _connected(super()._new_conn(), self.tracker)


class _TLSConnection(HTTPSConnection):
    tracker: SocketTracker | None = None

    def _new_conn(self) -> socket.socket:
        return _connected(super()._new_conn(), self.tracker)


def _pool_classes(tracker: SocketTracker) -> dict[str, type[HTTPConnectionPool]]:
    class Conn(_Connection):
        pass

    class TLSConn(_TLSConnection):
        pass

    Conn.tracker = TLSConn.tracker = tracker

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

        def _new_conn(self) -> Any:
            conn = super()._new_conn()
            tracker.add(conn)
            return conn

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = TLSConn

        def _new_conn(self) -> Any:
            conn = super()._new_conn()
            tracker.add(conn)
            return conn

    return {"http": Pool, "https": TLSPool}


class _Adapter(HTTPAdapter):
    def __init__(self, tracker: SocketTracker | None, **kwargs: Any) -> None:
        self._tracker = tracker or SocketTracker()
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self._tracker)


def make_session(tracker: SocketTracker | None = None, pool_maxsize: int = 16) -> requests.Session:
    """A Session whose connections register with `tracker`; thread-safe for our GET-only use."""
    # One retry, for GET only, when a pooled keep-alive connection turns out to have been closed by
    # the server as it was reused. Status retries (429/503) are ours: they must respect the budget.
    retry = Retry(
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
    adapter = _Adapter(tracker, pool_connections=4, pool_maxsize=pool_maxsize, max_retries=retry)
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

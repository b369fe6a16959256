"""Hostile FHIR servers on real sockets: trickling, huge, gzip bombs, refusing, not HTTP.

Each must cost the service bounded time, memory, threads and sockets, and the 412 must not let
the EHR tell one kind of peer from another (no port scanning through the service).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from cds_service.errors import FetchBusy, FetchError
from cds_service.fetch.budget import CallBudget, Workers
from cds_service.fetch.client import fetch_queries
from cds_service.fetch.policy import check_fhir_server, forbidden_address
from cds_service.fetch.session import AddressRefused, _checked
from cds_service.settings import Settings

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
QUERIES = {"patient": "Patient/p1", "conditions": "Condition?patient=p1", "labs": "Observation?patient=p1"}


class RawServer:
    """A loopback TCP server running `handle(conn)` for every connection, in its own thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.stop = threading.Event()
        self.open = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with self._lock:
            self.open += 1
        try:
            conn.recv(65536)  # the request
            self.handle(conn)
        except OSError:
            pass  # the service closed its end: what we want
        finally:
            conn.close()
            with self._lock:
                self.open -= 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    servers: list[RawServer] = []

    def start(handle: Callable[[socket.socket], None]) -> RawServer:
        servers.append(RawServer(handle))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _trickle(conn: socket.socket) -> None:
    conn.sendall(HEAD + b"Content-Length: 100000\r\n\r\n")
    for _ in range(100000):
        conn.sendall(b" ")
        time.sleep(1)


def _trickle_headers(conn: socket.socket) -> None:
    for byte in HEAD:
        conn.sendall(bytes([byte]))
        time.sleep(1)


def _fetch_threads(besides: frozenset[threading.Thread] = frozenset()) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fhir") and t not in besides]


def _client_connections(port: int) -> int:
    """Open TCP connections from this machine to `port` (ESTABLISHED or CLOSE_WAIT: still held)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote_port, state = int(fields[2].rsplit(":", 1)[1], 16), fields[3]
                count += remote_port == port and state in ("01", "08")
    return count


def _fail(url: str, **settings: object) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch_queries(url, "tok", QUERIES, Settings(**{"fhir_timeout_s": 1.0, **settings}))  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize("handler", [_trickle, _trickle_headers], ids=["body", "headers"])
def test_trickling_servers_leave_no_threads_or_connections_behind(serve, handler) -> None:
    server = serve(handler)
    others = frozenset(threading.enumerate())  # another test's fetch may still be winding down
    answered: list[float] = []

    def call() -> None:
        started = time.monotonic()
        _fail(server.url)
        answered.append(time.monotonic() - started)

    callers = [threading.Thread(target=call) for _ in range(10)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(10)
    assert len(answered) == 10 and max(answered) < 1.0 + 0.8  # each answered on time
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (_fetch_threads(others) or _client_connections(server.port)):
        time.sleep(0.1)
    assert not _fetch_threads(others)
    assert _client_connections(server.port) == 0
    # The server sees every connection closed, as soon as it next writes.
    while time.monotonic() < deadline + 2 and server.open:
        time.sleep(0.1)
    assert server.open == 0


def test_an_endless_body_is_too_large_within_the_budget(serve) -> None:
    def endless(conn: socket.socket) -> None:
        conn.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 65536
        while True:
            conn.sendall(b"10000\r\n" + chunk + b"\r\n")

    server = serve(endless)
    started = time.monotonic()
    err = _fail(server.url, fhir_max_call_bytes=2_000_000)
    assert "too large" in err.diagnostics and time.monotonic() - started < 1.5


def test_a_gzip_bomb_is_counted_as_what_it_expands_to(serve) -> None:
    bomb = gzip.compress(b" " * 100_000_000, compresslevel=9)  # ~100 KB on the wire

    def send_bomb(conn: socket.socket) -> None:
        conn.sendall(HEAD + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb)

    server = serve(send_bomb)
    tracemalloc.start()
    try:
        err = _fail(server.url, fhir_max_call_bytes=8_000_000, fhir_timeout_s=3.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "too large" in err.diagnostics
    assert peak < 40_000_000, f"peak {peak / 1e6:.0f} MB for an 8 MB budget"


def test_an_entry_budget_ends_the_call(serve) -> None:
    entries = [{"resource": {"resourceType": "Condition", "id": f"c{i}"}} for i in range(2000)]
    body = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": entries}).encode()

    def many(conn: socket.socket) -> None:
        conn.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    err = _fail(serve(many).url, fhir_max_call_entries=1000)
    assert "too large" in err.diagnostics and err.status == 412


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/fhir"


def test_closed_port_non_http_tls_and_silent_peers_read_the_same(serve) -> None:
    def ssh(conn: socket.socket) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    def silent(conn: socket.socket) -> None:
        time.sleep(3)

    plain = serve(lambda conn: conn.sendall(HEAD + b"Content-Length: 2\r\n\r\n{}"))
    urls = [_closed_port(), serve(ssh).url, plain.url.replace("http:", "https:"), serve(silent).url]
    messages = {_fail(url, fhir_timeout_s=0.5).diagnostics for url in urls}
    assert len(messages) == 1, messages
    assert "connection failed" in messages.pop()


def test_link_local_and_metadata_addresses_are_refused_in_every_form() -> None:
    import ipaddress

    for text in ("169.254.169.254", "169.254.0.1", "fe80::1", "::ffff:169.254.169.254", "fd00:ec2::254"):
        assert forbidden_address(ipaddress.ip_address(text)), text
    for text in ("127.0.0.1", "10.0.0.1", "::1", "93.184.216.34", "::ffff:127.0.0.1"):
        assert not forbidden_address(ipaddress.ip_address(text)), text
    settings = Settings(allow_insecure_fhir=True)
    for url in (
        "http://169.254.169.254/fhir",
        "http://2852039166/fhir",  # decimal
        "http://0xa9fea9fe/fhir",  # hex
        "http://0251.0376.0251.0376/fhir",  # octal
        "http://169.254.43518/fhir",  # short form
        "http://[::ffff:169.254.169.254]/fhir",
        "http://[fe80::1]/fhir",
    ):
        with pytest.raises(FetchError, match="link-local") as info:
            check_fhir_server(url, settings)
        assert info.value.status == 412 and info.value.issue_code == "security"


def test_a_name_that_resolves_to_a_link_local_address_is_refused_after_connecting() -> None:
    class Connected:
        closed = False

        def getpeername(self) -> tuple[str, int]:
            return ("169.254.169.254", 80)

        def close(self) -> None:
            self.closed = True

    sock = Connected()
    with pytest.raises(AddressRefused):
        _checked(sock)  # type: ignore[arg-type]
    assert sock.closed


def test_no_free_fetch_thread_is_a_503_with_retry_after(serve) -> None:
    settings = Settings(fhir_fetch_threads=4, fhir_timeout_s=2.0)
    with CallBudget(settings) as first, CallBudget(settings) as second:
        held = Workers(first, 3, 6)  # takes all four
        try:
            with pytest.raises(FetchBusy) as info:
                Workers(second, 3, 6)
            assert info.value.status == 503 and info.value.retry_after >= 1
        finally:
            held.close()
        Workers(second, 3, 6).close()  # free again once the first call's threads are done


def test_a_hook_call_finding_no_fetch_thread_is_answered_503_with_retry_after(tmp_path) -> None:
    from cds_service.web.app import create_app

    settings = Settings(
        auth_required=False, fhir_fetch_threads=4, database_url=f"sqlite:///{tmp_path / 'busy.db'}"
    )
    client = create_app(settings).test_client()
    body = {
        "hook": "patient-view",
        "hookInstance": "6b4a3f4e-1c1e-4c5e-9d7a-1f2e3d4c5b6a",
        "fhirServer": _closed_port(),
        "context": {"patientId": "p1"},
    }
    with CallBudget(settings) as other:
        held = Workers(other, 3, 6)  # another call holds every fetch thread
        try:
            resp = client.post("/cds-services/crc-metastases", json=body)
        finally:
            held.close()
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert resp.get_json()["resourceType"] == "OperationOutcome"

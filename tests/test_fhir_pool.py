"""Connections to a FHIR server are kept and reused across hook calls (fetch/session.py), and that
changes nothing a call may rely on: its deadline still ends its reads on a reused connection, a
connection it was using when its budget ended is never lent again, the token of one call is sent
only on its own requests, and each origin has its own bounded pool.

Real sockets: a small HTTP/1.1 server that keeps connections alive as real FHIR servers do
(pytest-httpserver's werkzeug server closes each one), and records each request's client port.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cds_service.errors import FetchError
from cds_service.fetch import session as transport
from cds_service.fetch.client import fetch_queries
from cds_service.settings import Settings

BUNDLE = json.dumps(
    {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}}}
        ],
    }
).encode()


@dataclass
class Seen:
    port: int
    path: str
    authorization: str | None


class KeepAlive:
    """A FHIR-ish server on a loopback port that keeps HTTP/1.1 connections open between requests."""

    def __init__(self, before: Callable[[int], None] = lambda n: None) -> None:
        self.log: list[Seen] = []
        self.before = before  # called with the request's number (1-based) before it is answered
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as real servers do: no 40 ms delayed-ACK stalls

            def do_GET(self) -> None:
                owner.log.append(Seen(self.client_address[1], self.path, self.headers.get("Authorization")))
                owner.before(len(owner.log))
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(BUNDLE)))
                self.end_headers()
                self.wfile.write(BUNDLE)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_port}/fhir"

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.log]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _fresh_pool() -> Iterator[None]:
    transport.close_pooled()
    yield
    transport.close_pooled()


@pytest.fixture
def fhir() -> Iterator[KeepAlive]:
    srv = KeepAlive()
    yield srv
    srv.stop()


def _fetch(
    base: str, token: str | None = "tok-a", timeout_s: float = 10.0, queries: dict | None = None
) -> dict:
    results, _ = fetch_queries(
        base, token, queries or {"conditions": "Condition?patient=p1"}, Settings(fhir_timeout_s=timeout_s)
    )
    return results


def test_a_second_call_reuses_the_first_calls_connection(fhir: KeepAlive) -> None:
    for _ in range(3):
        assert _fetch(fhir.base)["conditions"]["total"] == 1
    assert len(fhir.ports) == 3 and len(set(fhir.ports)) == 1, fhir.ports  # one TCP connection


def test_each_call_sends_only_its_own_token_on_a_shared_connection(fhir: KeepAlive) -> None:
    _fetch(fhir.base, token="tok-a")
    _fetch(fhir.base, token=None)
    _fetch(fhir.base, token="tok-b")
    assert [s.authorization for s in fhir.log] == ["Bearer tok-a", None, "Bearer tok-b"]
    assert len(set(fhir.ports)) == 1


def test_each_origin_has_its_own_connections(fhir: KeepAlive) -> None:
    other = KeepAlive()
    try:
        _fetch(fhir.base, token="tok-a")
        _fetch(other.base, token="tok-b")
        _fetch(fhir.base, token="tok-a")
        assert [s.authorization for s in other.log] == ["Bearer tok-b"]
        assert len(set(fhir.ports)) == 1 and set(fhir.ports).isdisjoint(other.ports)
    finally:
        other.stop()


def test_the_deadline_ends_a_read_on_a_reused_connection_which_is_not_lent_again() -> None:
    release = threading.Event()
    srv = KeepAlive(before=lambda n: release.wait(10) if n == 2 else None)  # the 2nd answer hangs
    try:
        _fetch(srv.base)  # warms the pool
        t0 = time.monotonic()
        with pytest.raises(FetchError) as info:
            _fetch(srv.base, timeout_s=0.5)
        assert time.monotonic() - t0 < 0.5 + 0.4
        assert info.value.status == 412
        assert _fetch(srv.base)["conditions"]["total"] == 1
    finally:
        release.set()
        srv.stop()
    first, stuck, third = srv.ports  # a read timeout is not retried: three requests in all
    assert stuck == first  # the hanging call was on the reused connection
    assert third != stuck  # which was closed, not lent again


def test_idle_connections_kept_per_origin_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "POOL_PER_ORIGIN", 2)
    barrier = threading.Barrier(5, timeout=5)
    srv = KeepAlive(before=lambda n: barrier.wait())  # five searches at once: five connections
    try:
        _fetch(srv.base, queries={f"s{i}": f"Condition?patient=p1&i={i}" for i in range(5)})
        assert len(set(srv.ports)) == 5
        srv.before = lambda n: None
        _fetch(srv.base, queries={f"s{i}": f"Condition?patient=p1&i={i}" for i in range(5)})
        # At most 2 were kept (the others closed as they came back); the second call reuses them.
        assert 1 <= len(set(srv.ports[5:]) & set(srv.ports[:5])) <= 2
    finally:
        srv.stop()

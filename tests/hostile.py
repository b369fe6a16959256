"""Hostile HTTP peers on real loopback sockets: servers that trickle, hang or answer well, by turns.

pytest-httpserver answers whole responses; these peers misbehave at the socket, as a broken or
malicious JWKS endpoint or FHIR server does.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable

# What a peer does with one connection, given the socket (the request has been read).
Behaviour = Callable[[socket.socket], None]


def respond(body: bytes, content_type: str = "application/json") -> Behaviour:
    def behave(sock: socket.socket) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)

    return behave


def trickle(stop: threading.Event, *, headers_too: bool = False, interval_s: float = 1.0) -> Behaviour:
    """One byte per interval: of the headers too, or of a long body after complete headers."""

    def behave(sock: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        data = head + b" " * 100_000
        if not headers_too:
            sock.sendall(head)
            data = data[len(head) :]
        for i in range(len(data)):
            if stop.wait(interval_s):
                return
            sock.sendall(data[i : i + 1])

    return behave


def hang(stop: threading.Event) -> Behaviour:
    """Read the request, then say nothing until the test ends."""

    def behave(_sock: socket.socket) -> None:
        stop.wait(120)

    return behave


class Peer:
    """A threaded TCP server; `behaviours` are used in turn, the last one for every later connection.

    Use as a context manager; set `behaviours` after creating it when they need `stop`.
    """

    def __init__(self, *behaviours: Behaviour, read_request: bool = True) -> None:
        self.behaviours = list(behaviours)
        self.connections = 0
        self.stop = threading.Event()  # set at close: hanging and trickling handlers end
        lock = threading.Lock()
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with lock:
                    index = peer.connections
                    peer.connections += 1
                behave = peer.behaviours[min(index, len(peer.behaviours) - 1)]
                self.request.settimeout(10)
                try:
                    if read_request:  # a TLS client speaks first with its hello: not HTTP
                        _read_head(self.request)
                    behave(self.request)
                except OSError:
                    pass  # the client gave up: that is what these peers are for

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def _read_head(sock: socket.socket) -> None:
    data = b""
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk

"""`cds-service serve` at the socket: what gunicorn refuses is still an OperationOutcome, no control
socket is left in $HOME, and a doubled slash is routed (one real server, raw sockets)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from .test_cli import _start, _stop


def _exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                headers = dict(
                    line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line
                )
                length = int(headers.get("Content-Length", "-1"))
                if 0 <= length <= len(body):
                    break
    status_line = data.partition(b"\r\n")[0]
    head, _, body = data.partition(b"\r\n\r\n")
    headers = {
        k.lower(): v
        for k, v in (line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
    }
    return int(status_line.split()[1]), headers, body


@pytest.mark.slow
def test_serve_at_the_socket(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"CDS_AUTH_REQUIRED": "false", "HOME": str(home), "XDG_RUNTIME_DIR": ""}
    proc, base = _start(["serve", "--workers", "1", "--threads", "2"], env, tmp_path)
    port = int(base.rsplit(":", 1)[1])
    try:
        refusals = {
            # one header over gunicorn's 8190-byte field limit
            "field size": (
                b"GET /cds-services HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
                431,
            ),
            # more than gunicorn's 100 header fields
            "fields": (
                b"GET /cds-services HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"X-H%d: v\r\n" % i for i in range(120))
                + b"\r\n",
                431,
            ),
            "request line": (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            "malformed": (b"GET /cds-services HTTP/9\r\nHost: x\r\n\r\n", 400),
        }
        for name, (raw, expected) in refusals.items():
            status, headers, body = _exchange(port, raw)
            assert status == expected, (name, status, body[:200])
            assert headers["content-type"].startswith("application/fhir+json"), (name, headers)
            doc = json.loads(body)
            assert doc["resourceType"] == "OperationOutcome" and doc["issue"][0]["severity"] == "error", name
            assert b"aaaa" not in body and b"<html" not in body.lower()
        # A doubled slash, as a client whose base URL ends in "/" sends it: routed, not redirected.
        status, _, body = _exchange(
            port, b"GET //cds-services/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status == 200 and json.loads(body)["services"][0]["id"] == "crc-metastases"
        # gunicorn >= 25.1 would have opened its control socket under $HOME (the data volume).
        assert not list(home.rglob("*.ctl")) and not (home / ".gunicorn").exists()
    finally:
        log = _stop(proc)
    assert "Traceback" not in log
    assert "a" * 100 not in log  # the refused request's content is not logged
    assert os.environ.get("HOME") != str(home)

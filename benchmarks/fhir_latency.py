"""FHIR mode latency: no prefetch, the service reads a FHIR server that adds 50 ms per request.

    python benchmarks/fhir_latency.py [--delay-ms 50] [--repeat 10]

The FHIR server is the demo's read-only endpoint over the demo patients, on a loopback port,
with an artificial delay per request. For a few demo patients it prints the median time of a
no-prefetch hook call through the WSGI app beside the slowest single search chain (every page of
one prefetch search, fetched sequentially with plain requests; the median of `--repeat` runs).
Target: the hook call takes <= 1.5x the slowest chain — the searches run concurrently, not one
after another. Twice: a server that closes each connection after its answer (werkzeug's), and one
that keeps HTTP/1.1 connections alive, as real FHIR servers do, so the service's kept connections
(fetch/session.py) are reused from one call to the next.

Then a server that pages at 20 whatever `_count` asks (50 ms a request, offset paging with a
total, as HAPI and Medplum do) and a chart with 1,001 Procedures: the call must answer within the
default 5 s budget (51 pages one after another would take 2.6 s of latency alone; pages numbered
by offset are fetched side by side).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask import Flask  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402
from werkzeug.test import EnvironBuilder, run_wsgi_app  # noqa: E402

from cds_service.cli.fixtures import demo_resources  # noqa: E402
from cds_service.hooks.catalogue import fill_template, services  # noqa: E402
from cds_service.settings import Settings  # noqa: E402
from cds_service.web.app import create_app  # noqa: E402
from cds_service.web.demo_fhir import create_fhir_blueprint  # noqa: E402

PATIENTS = ["demo-d01", "demo-d14", "demo-d25"]


def keep_alive_server(app: Flask) -> tuple[str, ThreadingHTTPServer]:
    """The WSGI app behind an HTTP/1.1 server that keeps connections open between requests."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # as real servers do: no 40 ms delayed-ACK stalls

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            environ = EnvironBuilder(
                path=parts.path, query_string=parts.query, headers=list(self.headers.items())
            ).get_environ()
            app_iter, status, headers = run_wsgi_app(app, environ, buffered=True)
            body = b"".join(app_iter)
            self.send_response(int(status.split()[0]))
            for name, value in headers.items():
                if name.lower() not in ("content-length", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/fhir", server


def slow_fhir_server(
    delay_s: float, extra: list[dict] | None = None, max_page: int | None = None, keep_alive: bool = False
) -> tuple[str, object]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log in the figures
    app = Flask("slow-fhir")
    app.register_blueprint(create_fhir_blueprint(demo_resources() + (extra or []), "/fhir"))

    @app.before_request
    def _delay() -> None:
        time.sleep(delay_s)

    if max_page is not None:
        inner = app.wsgi_app

        def capped(environ: dict, start_response: object) -> object:
            # A server with its own maximum page size: any larger _count is cut down to it.
            query = environ.get("QUERY_STRING", "")
            parts = [p for p in query.split("&") if p and not p.startswith("_count=")]
            environ["QUERY_STRING"] = "&".join([*parts, f"_count={max_page}"])
            return inner(environ, start_response)

        app.wsgi_app = capped  # type: ignore[method-assign]

    if keep_alive:
        return keep_alive_server(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/fhir", server


def chain_seconds(base: str, query: str, repeat: int = 1) -> float:
    """One prefetch query with all its pages, sequentially: the floor for that search (the median of
    `repeat` runs, each on a fresh connection)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        url: str | None = f"{base}/{query}"
        while url:
            doc = requests.get(url, timeout=30).json()
            url = next((lk["url"] for lk in doc.get("link", []) if lk.get("relation") == "next"), None)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=50)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    for keep_alive in (False, True):
        table(args.delay_ms, args.repeat, keep_alive)
    big_chart(args.delay_ms / 1000)
    return 0


def table(delay_ms: float, repeat: int, keep_alive: bool) -> None:
    base, server = slow_fhir_server(delay_ms / 1000, keep_alive=keep_alive)
    service = services()["crc-metastases"]
    client = create_app(Settings(auth_required=False, fhir_timeout_s=30)).test_client()
    print(
        f"\nFHIR server adds {delay_ms:g} ms per request; {len(service.prefetch)} prefetch queries; "
        + ("connections kept alive" if keep_alive else "each connection closed after its answer")
    )
    print(
        f"{'patient':<12}{'hook median ms':>16}{'slowest chain ms':>18}{'sum of chains ms':>18}{'ratio':>7}"
    )
    for pid in PATIENTS:
        queries = [fill_template(t, {"context.patientId": pid}) for t in service.prefetch.values()]
        chains = [chain_seconds(base, q, max(1, repeat // 2)) for q in queries if q]
        body = {
            "hook": "patient-view",
            "fhirServer": base,
            "context": {"patientId": pid},
            "fhirAuthorization": {
                "access_token": "bench",
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/*.read",
                "subject": "bench",
            },
        }
        times = []
        for _ in range(repeat):
            body["hookInstance"] = str(uuid.uuid4())
            started = time.perf_counter()
            resp = client.post("/cds-services/crc-metastases", json=body)
            times.append(time.perf_counter() - started)
            assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
        median = statistics.median(times)
        print(
            f"{pid:<12}{median * 1000:>16.0f}{max(chains) * 1000:>18.0f}{sum(chains) * 1000:>18.0f}"
            f"{median / max(chains):>7.2f}"
        )
    server.shutdown()


def big_chart(delay_s: float, patient: str = "demo-d01", extra: int = 1000) -> None:
    """1,001 Procedures on a 20-per-page server: answered within the default 5 s budget?"""
    procedures = [
        {
            "resourceType": "Procedure",
            "id": f"bench-colonoscopy-{i:04d}",
            "status": "completed",
            "code": {
                "coding": [{"system": "http://snomed.info/sct", "code": "73761001"}],
                "text": "Colonoscopy",
            },
            "subject": {"reference": f"Patient/{patient}"},
            "performedDateTime": f"{2004 + i // 300}-{1 + i % 12:02d}-{1 + i % 28:02d}",
        }
        for i in range(extra)
    ]
    base, server = slow_fhir_server(delay_s, procedures, max_page=20)
    budget = Settings().fhir_timeout_s
    client = create_app(Settings(auth_required=False)).test_client()
    chain = chain_seconds(base, f"Procedure?patient={patient}")
    body = {
        "hook": "patient-view",
        "fhirServer": base,
        "context": {"patientId": patient},
        "fhirAuthorization": {
            "access_token": "bench",
            "token_type": "Bearer",
            "expires_in": 300,
            "subject": "b",
        },
    }
    times = []
    for _ in range(3):
        body["hookInstance"] = str(uuid.uuid4())
        started = time.perf_counter()
        resp = client.post("/cds-services/crc-metastases", json=body)
        times.append(time.perf_counter() - started)
        assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    median = statistics.median(times)
    print(
        f"\n{extra + 1:,} Procedures, 20 a page, {delay_s * 1000:g} ms a request: hook median {median * 1000:.0f} ms, "
        f"Procedure pages one after another {chain * 1000:.0f} ms, budget {budget * 1000:.0f} ms "
        f"({'within' if max(times) < budget else 'OVER'} the budget; ratio to the sequential chain "
        f"{median / chain:.2f})"
    )
    server.shutdown()


if __name__ == "__main__":
    sys.exit(main())

"""Memory of FHIR reads under a hostile server: four calls at once, nine huge Bundles each.

    python benchmarks/fhir_memory.py [--entries 100000] [--calls 4]

A loopback server answers every search with the same Bundle of `--entries` Conditions (about
16 MB at 100,000). Each call would read nine of them; the per-call byte budget
(`CDS_FHIR_MAX_CALL_BYTES`) stops it. Prints the growth of this process's peak resident memory and
each call's outcome and time. Target: within +600 MiB for four calls at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cds_service.errors import FetchError  # noqa: E402
from cds_service.fetch.client import fetch_queries  # noqa: E402
from cds_service.settings import Settings  # noqa: E402


def big_bundle_server(entries: int) -> int:
    resources = [
        {
            "resource": {
                "resourceType": "Condition",
                "id": f"c{i}",
                "subject": {"reference": "Patient/p1"},
                "code": {"text": "x" * 40},
            }
        }
        for i in range(entries)
    ]
    body = json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": resources}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: %d\r\n\r\n" % len(body)
    server = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            conn.sendall(head + body)
        except OSError:
            pass  # the service closed its end once its budget was spent
        finally:
            conn.close()

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    print(f"each answer: a Bundle of {entries:,} entries, {len(body) / 1e6:.1f} MB")
    return int(server.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    port = big_bundle_server(args.entries)
    settings = Settings(fhir_timeout_s=10)
    queries = {f"search{i}": f"Condition?patient=p1&n={i}" for i in range(9)}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes: list[str] = []

    def call() -> None:
        started = time.monotonic()
        try:
            fetch_queries(f"http://127.0.0.1:{port}/fhir", "bench", queries, settings)
            outcome = "200"
        except FetchError as exc:
            outcome = (
                f"{exc.status} {'too large' if 'too large' in exc.diagnostics else exc.diagnostics[:60]}"
            )
        outcomes.append(f"{outcome} in {time.monotonic() - started:.2f} s")

    callers = [threading.Thread(target=call) for _ in range(args.calls)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"{args.calls} calls at once, byte budget {settings.fhir_max_call_bytes / 2**20:.0f} MiB each:")
    for o in outcomes:
        print(f"  {o}")
    print(f"peak resident memory grew by {growth:.0f} MiB (target: within 600 MiB)")
    return 0


if __name__ == "__main__":
    logging.getLogger("cds_service").setLevel(logging.CRITICAL)  # the figures, not the fetch log
    sys.exit(main())

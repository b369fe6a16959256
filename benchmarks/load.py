"""Load test: `cds-service serve` under concurrent hook calls and feedback posts; its targets are in the README.

    python benchmarks/load.py [--clients 50] [--seconds 20] [--workers 2] [--threads 8]
                              [--resources 500] [--think-ms 1000] [--database-url URL] [--max-p95-ms 50]

Starts the production server (gunicorn, `--workers` processes) on loopback with a fresh SQLite
database (or `--database-url`, e.g. a PostgreSQL database), then runs `--clients` concurrent
clients for `--seconds`: each posts a patient-view call with a full-prefetch chart of about
`--resources` resources (a new hookInstance every time), then feedback on the card it got
(alternately accepted and overridden), then pauses `--think-ms` on average. Prints throughput,
p50/p95/p99 per kind of request and the errors, and checks that the store holds exactly one audit
row per answered call and one feedback row per accepted feedback post. Exit status 1 when a
request failed, a row is missing or p95 exceeds `--max-p95-ms`.

A client is one EHR user: 50 users each opening a chart about once a second is far above any
real clinical rate, yet leaves the server time to answer; with `--think-ms 0` the clients fire
back-to-back and the latency is just the queue in front of a saturated CPU (50 clients divided by
the throughput). Clients are threads of this process (requests sessions, keep-alive) sharing the
CPUs with the server, so the figures are those of the whole box.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hook_latency import synthetic_chart  # noqa: E402

from cds_service.cli.commands import request_from_bundle  # noqa: E402
from cds_service.settings import Settings  # noqa: E402
from cds_service.store.database import open_store  # noqa: E402

SERVICE = "/cds-services/crc-metastases"
_PLACEHOLDER = "00000000-0000-4000-8000-00000000beef"


@dataclass
class Tally:
    """What every client did; appended to under a lock."""

    hook_ms: list[float] = field(default_factory=list)
    feedback_ms: list[float] = field(default_factory=list)
    hooks_ok: int = 0
    feedback_ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, database_url: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    # Keep-alive longer than the clients' longest pause (10 x think): otherwise the server closes an
    # idle connection just as a client reuses it, and that request fails before reaching the app.
    env = {
        **os.environ,
        "GUNICORN_CMD_ARGS": f"--keep-alive {max(5, int(args.think_ms / 100) + 5)}",
        "CDS_AUTH_REQUIRED": "false",
        "CDS_DATABASE_URL": database_url,
        "CDS_AUDIT_KEY": "load-test-key-" + "x" * 32,
        "CDS_LOG_LEVEL": os.environ.get("CDS_LOG_LEVEL", "WARNING"),
    }
    with open(workdir / "server.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cds_service.cli.main",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(args.workers),
                "--threads",
                str(args.threads),
            ],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except requests.ConnectionError:
            time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"the server did not start; see {workdir / 'server.log'}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM: gunicorn lets the workers finish their requests (and so their audit writes)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _feedback(card: dict, n: int) -> dict:
    if n % 2 and card.get("suggestions"):
        return {
            "card": card["uuid"],
            "outcome": "accepted",
            "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
        }
    reason = (card.get("overrideReasons") or [None])[0]
    entry: dict = {"card": card["uuid"], "outcome": "overridden"}
    if reason:
        entry["overrideReason"] = {"reason": reason, "userComment": "load test"}
    return {"feedback": [entry]}


def client(base: str, body_template: str, stop_at: float, think_s: float, tally: Tally) -> None:
    n = 0
    rng = random.Random()
    # Clients that start together and pause alike would arrive in bursts, all 50 at once; a
    # random start and exponential pauses make arrivals independent, as from separate EHR users.
    time.sleep(rng.uniform(0, think_s))
    with requests.Session() as http:
        while time.monotonic() < stop_at:
            n += 1
            body = body_template.replace(_PLACEHOLDER, str(uuid.uuid4())).encode()
            try:
                t0 = time.perf_counter()
                resp = http.post(
                    f"{base}{SERVICE}", data=body, timeout=30, headers={"Content-Type": "application/json"}
                )
                hook_ms = (time.perf_counter() - t0) * 1000
                cards = resp.json().get("cards") if resp.status_code == 200 else None
                if not cards:
                    _error(tally, f"hook {resp.status_code}" + ("" if cards is None else " without a card"))
                    continue
                with tally.lock:
                    tally.hook_ms.append(hook_ms)
                    tally.hooks_ok += 1
                t0 = time.perf_counter()
                fb = http.post(f"{base}{SERVICE}/feedback", json=_feedback(cards[0], n), timeout=30)
                fb_ms = (time.perf_counter() - t0) * 1000
                if fb.status_code != 200:
                    _error(tally, f"feedback {fb.status_code}")
                    continue
                with tally.lock:
                    tally.feedback_ms.append(fb_ms)
                    tally.feedback_ok += 1
            except requests.RequestException as exc:
                _error(tally, type(exc).__name__)
            if think_s:
                time.sleep(min(rng.expovariate(1 / think_s), 10 * think_s))


def _error(tally: Tally, what: str) -> None:
    with tally.lock:
        tally.errors[what] += 1


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _line(label: str, values: list[float], seconds: float) -> str:
    return (
        f"{label:<10}{len(values):>8}{len(values) / seconds:>9.1f}/s"
        f"{_pct(values, 0.50):>9.1f}{_pct(values, 0.95):>9.1f}{_pct(values, 0.99):>9.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--resources", type=int, default=500)
    parser.add_argument(
        "--think-ms",
        type=float,
        default=1000,
        help="mean pause of each client between rounds (exponentially distributed); "
        "0: back-to-back, which measures the saturation throughput instead",
    )
    parser.add_argument("--database-url", help="default: a fresh SQLite file in a temporary directory")
    parser.add_argument("--max-p95-ms", type=float, default=50)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="cds-load-"))
    database_url = args.database_url or f"sqlite:///{workdir / 'cds.db'}"
    store = open_store(Settings(auth_required=False, database_url=database_url, audit_key="x" * 32))
    before = store.counts()
    request = request_from_bundle(synthetic_chart(args.resources))
    request["hookInstance"] = _PLACEHOLDER
    template = json.dumps(request)

    proc, base = start_server(args, database_url, workdir)
    tally = Tally()
    try:
        for _ in range(4):  # warm-up, one per thread pool at least; not counted
            requests.post(
                f"{base}{SERVICE}",
                data=template.replace(_PLACEHOLDER, str(uuid.uuid4())),
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
        # Audit records are written just behind the answers: wait for the warm-up's to land.
        deadline = time.monotonic() + 10
        while store.counts()["hook_call"] < before["hook_call"] + 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        warm = store.counts()
        started = time.monotonic()
        threads = [
            threading.Thread(
                target=client, args=(base, template, started + args.seconds, args.think_ms / 1000, tally)
            )
            for _ in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    finally:
        stop_server(proc)
    after = store.counts()

    calls_stored = after["hook_call"] - warm["hook_call"]
    feedback_stored = after["feedback"] - before["feedback"]
    all_ms = tally.hook_ms + tally.feedback_ms
    print(
        f"{args.clients} clients, {elapsed:.1f} s, {args.workers} workers x {args.threads} threads, "
        f"chart of {args.resources} resources ({len(template) // 1024} KB), think {args.think_ms:g} ms, "
        f"{database_url.split(':', 1)[0]}"
    )
    print(f"{'':<10}{'requests':>8}{'rate':>11}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    print(_line("hook", tally.hook_ms, elapsed))
    print(_line("feedback", tally.feedback_ms, elapsed))
    print(_line("all", all_ms, elapsed))
    errors = sum(tally.errors.values())
    print(f"errors: {errors}" + (f" ({dict(tally.errors)})" if errors else ""))
    rows_ok = calls_stored == tally.hooks_ok and feedback_stored == tally.feedback_ok
    print(
        f"stored: {calls_stored} audit rows for {tally.hooks_ok} answered calls, "
        f"{feedback_stored} feedback rows for {tally.feedback_ok} accepted posts -> "
        f"{'nothing lost' if rows_ok else 'MISMATCH'}"
    )
    p95 = _pct(all_ms, 0.95)
    print(
        f"p95 {p95:.1f} ms (target <= {args.max_p95_ms:g} ms): {'ok' if p95 <= args.max_p95_ms else 'MISSED'}"
    )
    print(f"server log and database: {workdir}")
    return 0 if errors == 0 and rows_ok and p95 <= args.max_p95_ms else 1


if __name__ == "__main__":
    sys.exit(main())

"""Card calls over HTTP against the HTTP floor: `cds-service serve` beside a parse-only app.

    python benchmarks/http_floor.py [--rounds 300] [--seconds 8] [--clients 50] [--max-seconds 480]

Starts two servers on loopback under the same gunicorn configuration (`serve`'s, with its default
workers and threads, or CDS_WORKERS / CDS_THREADS / GUNICORN_CMD_ARGS when set):
- the service, `cds-service serve`, with client-JWT checks off (CDS_AUTH_REQUIRED=false), a fresh
  SQLite database in a temporary directory and its default logging;
- the floor, a Flask app that only parses the body: `json.loads(request.get_data())` and
  `{"cards": []}`. No service can answer a call for less than reading it.

Latency: for each body, one keep-alive connection per server; every round sends the same bytes
(with a fresh hookInstance) to both servers one after the other, the first of the pair alternating
from round to round, so both see the same machine. Prints median and p95 (from sending the request
to the answer's last byte) for each server and the ratios, and each server's CPU per call (user +
system time of all its processes over the measured calls, from /proc): on a machine shared with
other work the wall-clock ratios mostly measure waiting for a core, the CPU ratio what a call costs.
The bodies:
- demo patient 01 (fixtures/fhir/01-*.json, a patient-view request with full prefetch; a card);
- the same, every resource with a new id and meta.versionId on every call ("never seen": only what
  new patients share, such as codes and statuses, can be reused; an EHR sends the same chart again
  each time a clinician reopens it, but a new patient is never seen before);
- a real Synthea chart (../shared/fhir-external, read in place) with a lung metastasis Condition
  added here (a card);
- a real Synthea chart of a patient without colorectal cancer (out of scope: no card).

Saturation: `--clients` keep-alive clients with no think time post a 500-resource chart (the one
benchmarks/hook_latency.py builds; a card) for `--seconds`, alternately to each server, twice each;
prints calls/s for both, the ratio, and the servers' CPU per call (all their processes, from /proc).

Targets (issue "card calls at the HTTP floor"): card calls median <= 1.5x the floor and p95 <= 2x
the floor's p95; out-of-scope calls <= 1.3x; saturation throughput >= 0.8x the floor's. The
machine is shared: read the ratios, measured side by side, rather than the absolute figures.
The whole run stops by itself after `--max-seconds`, servers included.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hook_latency import as_new_patient, synthetic_chart  # noqa: E402

from cds_service.cli.commands import request_from_bundle  # noqa: E402

SERVICE = "/cds-services/crc-metastases"
SHARED = ROOT.parent / "shared" / "fhir-external" / "synthea-smart"
# An active colon cancer resected in 2021 (397 resources) and, out of scope, the source's chart with
# the most resources (1,244; metastatic prostate cancer, no colorectal cancer).
SYNTHEA_IN_SCOPE = "crc/Luis_Miguel_Delarosa_*.json.gz"
SYNTHEA_OUT_OF_SCOPE = "non-crc/Vito_Feeney_*.json.gz"
_PLACEHOLDER = "00000000-0000-4000-8000-00000000beef"
_VERSION = "bench-version-placeholder"
_HEADERS = {"Content-Type": "application/json"}


# --- the servers ------------------------------------------------------------------------------------


def serve_floor(port: int) -> None:
    """Runs in the floor's own process: the parse-only app under `serve`'s gunicorn setup."""
    from flask import Flask, request

    from cds_service.cli.server import run_gunicorn
    from cds_service.settings import Settings

    floor = Flask("floor")

    @floor.post(SERVICE)
    def parse_only() -> Any:
        json.loads(request.get_data())
        return {"cards": []}

    @floor.get("/healthz")
    def healthz() -> Any:
        return {"status": "ok"}

    settings = Settings()  # serve's workers, threads and logs, env included
    run_gunicorn(
        floor,
        settings,
        "serve",
        host="127.0.0.1",
        port=port,
        workers=settings.workers,
        threads=settings.threads,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int

    def cpu_seconds(self) -> float:
        """User + system CPU of every process of the server (its own process group), so far."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[2]) == self.proc.pid:  # pgrp
                total += (int(fields[11]) + int(fields[12])) / tick
        return total


def start(name: str, argv: list[str], env: dict[str, str], workdir: Path) -> Server:
    port = _free_port()
    with open(workdir / f"{name}.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [sys.executable, *argv, "--port", str(port)],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    server = Server(name, proc, port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return server
        except OSError:
            time.sleep(0.2)
    stop(server)
    raise SystemExit(f"{name} did not start; see {workdir / (name + '.log')}")


def stop(server: Server) -> None:
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


# --- the bodies -------------------------------------------------------------------------------------


def _template(bundle: dict[str, Any], unseen: bool = False) -> str:
    """The request as text; `unseen`: every resource but the Patient gets a new id and
    meta.versionId on every call (hook_latency.as_new_patient), so nothing computed for a
    resource's content on an earlier call can be reused: a new patient's chart."""
    request = request_from_bundle(bundle)
    request["hookInstance"] = _PLACEHOLDER
    if unseen:
        as_new_patient(request, _VERSION)
    return json.dumps(request)


def with_lung_metastasis(bundle: dict[str, Any]) -> dict[str, Any]:
    """The chart plus a confirmed, active secondary malignant neoplasm of lung a year after resection."""
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    condition = {
        "resourceType": "Condition",
        "id": "bench-lung-metastasis",
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
            ]
        },
        "verificationStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}
            ]
        },
        "code": {
            "coding": [
                {
                    "system": "http://snomed.info/sct",
                    "code": "94391008",
                    "display": "Secondary malignant neoplasm of lung",
                }
            ]
        },
        "subject": {"reference": f"Patient/{patient['id']}"},
        "onsetDateTime": "2022-06-01",
    }
    return {**bundle, "entry": [*bundle["entry"], {"resource": condition}]}


def _synthea(pattern: str) -> dict[str, Any] | None:
    paths = sorted(SHARED.glob(pattern))
    return json.loads(gzip.decompress(paths[0].read_bytes())) if paths else None


@dataclass
class Body:
    label: str
    resources: int
    template: str
    cards: bool  # whether the service must answer with a card

    def fresh(self) -> bytes:
        call = uuid.uuid4()
        return self.template.replace(_PLACEHOLDER, str(call)).replace(_VERSION, call.hex).encode()


def bodies() -> list[Body]:
    demo = json.loads(next((ROOT / "fixtures" / "fhir").glob("01-*.json")).read_text(encoding="utf-8"))
    out = [
        Body("demo patient 01", len(demo["entry"]), _template(demo), True),
        Body("demo 01, never seen", len(demo["entry"]), _template(demo, unseen=True), True),
    ]
    crc, other = _synthea(SYNTHEA_IN_SCOPE), _synthea(SYNTHEA_OUT_OF_SCOPE)
    if crc is None or other is None:
        print(f"(real Synthea charts skipped: not found under {SHARED})")
    else:
        chart = with_lung_metastasis(crc)
        out.append(Body("Synthea + lung met", len(chart["entry"]), _template(chart), True))
        out.append(Body("Synthea + met, unseen", len(chart["entry"]), _template(chart, unseen=True), True))
        out.append(Body("Synthea out of scope", len(other["entry"]), _template(other), False))
    return out


# --- latency ----------------------------------------------------------------------------------------


class Client:
    """One keep-alive connection to a server."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, body: bytes) -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        self.conn.request("POST", SERVICE, body=body, headers=_HEADERS)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, data, (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        self.conn.close()


def _check(server: Server, body: Body, status: int, data: bytes) -> None:
    if status != 200:
        raise SystemExit(f"{server.name}: HTTP {status} for {body.label}: {data[:300]!r}")
    if server.name == "service" and bool(json.loads(data)["cards"]) != body.cards:
        raise SystemExit(f"service: {body.label} should {'' if body.cards else 'not '}answer with a card")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(
    service: Server, floor: Server, body: Body, rounds: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Interleaved calls: the latencies, and each server's CPU ms per measured call (all its
    processes and threads, the audit writer included), which a busy machine distorts far less."""
    clients = {s.name: (s, Client(s.port)) for s in (service, floor)}
    times: dict[str, list[float]] = {"service": [], "floor": []}
    cpu = {}
    try:
        for n in range(rounds + 10):  # the first 10 rounds warm up connections, caches, templates
            if n == 10:
                cpu = {name: server.cpu_seconds() for name, (server, _) in clients.items()}
            payload = body.fresh()
            order = ("service", "floor") if n % 2 else ("floor", "service")
            for name in order:
                server, client = clients[name]
                status, data, ms = client.post(payload)
                _check(server, body, status, data)
                if n >= 10:
                    times[name].append(ms)
        time.sleep(0.2)  # the audit record of the last call is written behind its answer
        cpu = {
            name: (server.cpu_seconds() - cpu[name]) * 1000 / rounds for name, (server, _) in clients.items()
        }
    finally:
        for _, client in clients.values():
            client.close()
    return times, cpu


# --- saturation -------------------------------------------------------------------------------------


@dataclass
class Burst:
    calls: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _hammer(port: int, body: Body, stop_at: float, burst: Burst) -> None:
    client = Client(port)
    calls = errors = 0
    try:
        while time.monotonic() < stop_at:
            try:
                status, _, _ = client.post(body.fresh())
            except (OSError, http.client.HTTPException):
                errors += 1
                client.close()
                client = Client(port)
                continue
            if status == 200:
                calls += 1
            else:
                errors += 1
    finally:
        client.close()
    with burst.lock:
        burst.calls += calls
        burst.errors += errors


def saturate(server: Server, body: Body, clients: int, seconds: float) -> tuple[int, int, float, float]:
    """(answered calls, errors, elapsed s, server CPU s) with `clients` back-to-back clients."""
    burst = Burst()
    cpu0, started = server.cpu_seconds(), time.monotonic()
    threads = [
        threading.Thread(target=_hammer, args=(server.port, body, started + seconds, burst))
        for _ in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return burst.calls, burst.errors, elapsed, server.cpu_seconds() - cpu0


# --- main -------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="interleaved calls per body and server")
    parser.add_argument("--seconds", type=float, default=8, help="length of each saturation burst")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--resources", type=int, default=500, help="the saturation chart's size")
    parser.add_argument("--max-seconds", type=float, default=480, help="the whole run's hard limit")
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(args.port)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="http-floor-"))
    env = {
        **os.environ,
        "CDS_AUTH_REQUIRED": "false",
        "CDS_DATABASE_URL": f"sqlite:///{workdir / 'cds.db'}",
        "CDS_AUDIT_KEY": "http-floor-bench-" + "x" * 32,
    }
    rows = bodies()
    saturation_body = Body(
        f"synthetic {args.resources}", args.resources, _template(synthetic_chart(args.resources)), True
    )
    servers: list[Server] = []

    def overtime(_signum: int, _frame: Any) -> None:
        for s in servers:
            stop(s)
        print(f"stopped: the run took longer than --max-seconds {args.max_seconds:g}", file=sys.stderr)
        os._exit(3)

    signal.signal(signal.SIGALRM, overtime)
    signal.alarm(max(1, int(args.max_seconds)))
    try:
        servers.append(
            start("service", ["-m", "cds_service.cli", "serve", "--host", "127.0.0.1"], env, workdir)
        )
        servers.append(start("floor", [str(Path(__file__).resolve()), "--serve-floor"], env, workdir))
        service, floor = servers
        defaults_note = (
            f"gunicorn as `serve` (CDS_WORKERS={os.environ.get('CDS_WORKERS', 'default')}, "
            f"CDS_THREADS={os.environ.get('CDS_THREADS', 'default')}); {args.rounds} interleaved rounds per body"
        )
        print(defaults_note)
        print(
            f"{'body':<22}{'resources':>10}{'KB':>6}{'service p50':>12}{'p95':>8}"
            f"{'floor p50':>11}{'p95':>8}{'ratio p50':>11}{'p95':>7}  {'target':<26}"
            f"{'CPU ms/call service':>20}{'floor':>7}{'ratio':>7}"
        )
        for body in rows:
            t, cpu_ms = latency(service, floor, body, args.rounds)
            s50, s95 = statistics.median(t["service"]), _pct(t["service"], 0.95)
            f50, f95 = statistics.median(t["floor"]), _pct(t["floor"], 0.95)
            target = "p50<=1.5 p95<=2" if body.cards else "p50<=1.3"
            ok = (s50 / f50 <= 1.5 and s95 / f95 <= 2) if body.cards else s50 / f50 <= 1.3
            verdict = f"{target} {'ok' if ok else 'MISSED'}"
            print(
                f"{body.label:<22}{body.resources:>10}{len(body.template) // 1024:>6}{s50:>12.2f}{s95:>8.2f}"
                f"{f50:>11.2f}{f95:>8.2f}{s50 / f50:>11.2f}{s95 / f95:>7.2f}  {verdict:<26}"
                f"{cpu_ms['service']:>20.2f}{cpu_ms['floor']:>7.2f}{cpu_ms['service'] / max(cpu_ms['floor'], 1e-9):>7.2f}"
            )
        print(
            "CPU ms/call: user + system CPU of all the server's processes over the measured calls\n"
            "(/proc, 10 ms ticks), the audit writer included; on a busy machine the wall-clock ratios\n"
            "mostly measure waiting for a core, the CPU ratios what each call costs."
        )
        # Saturation, alternating servers so both share the machine's noise; a short burst first
        # warms every worker and thread.
        for s in (service, floor):
            saturate(s, saturation_body, args.clients, 1.0)
        totals = {"service": [0, 0, 0.0, 0.0], "floor": [0, 0, 0.0, 0.0]}
        for s in (service, floor, floor, service):
            for i, v in enumerate(saturate(s, saturation_body, args.clients, args.seconds)):
                totals[s.name][i] += v
        print(
            f"\nsaturation: {args.clients} clients, no think time, {saturation_body.label} resources "
            f"({len(saturation_body.template) // 1024} KB, a card), 2 x {args.seconds:g} s per server"
        )
        print(f"{'server':<10}{'calls':>8}{'errors':>8}{'calls/s':>9}{'CPU ms/call':>13}")
        rate = {}
        for name, (calls, errors, elapsed, cpu) in totals.items():
            rate[name] = calls / elapsed
            per_call = cpu * 1000 / calls if calls else float("nan")
            print(f"{name:<10}{int(calls):>8}{int(errors):>8}{rate[name]:>9.1f}{per_call:>13.2f}")
        ratio = rate["service"] / rate["floor"]
        print(
            f"throughput service / floor: {ratio:.2f} (target >= 0.8: {'ok' if ratio >= 0.8 else 'MISSED'})"
        )
        print(f"server logs and database: {workdir}")
    finally:
        signal.alarm(0)
        for s in servers:
            stop(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

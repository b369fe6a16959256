"""What the durable audit trail costs a hook call, measured side by side in one run.

    python benchmarks/audit_cost.py [--calls N] [--threads T]

Four apps answer the same card-producing call (demo patient 01) through their WSGI callables, the
calls interleaved so that each variant sees the same machine:

  behind    the default: the record is appended to the local spool before the answer (a killed
            process loses nothing) and fdatasync'd right behind it by the spool's syncer thread
            (group commit); the forwarder thread copies it to the database
  before    CDS_AUDIT_SYNC_BEFORE_ANSWER=true: the answer also waits for the record's fdatasync
  no fsync  CDS_AUDIT_FSYNC=false: appended, never synced
  no audit  the same app with the audit call replaced by nothing: the floor for the others

Printed: latency until the answer's last byte, p50/p95, sequential and with T concurrent callers
(where group commit shares one fdatasync between calls); then the audit CPU per call — the
process's CPU time (all threads: the request side and the forwarder's database writes, system time
included) over N `AuditTrail.record` calls and the flush that puts them in the database, divided by
N, for each mode. Target: at most 0.3 ms a call. The database is a throwaway SQLite file
(synchronous=FULL); BENCH_DATABASE_URL points the default variant elsewhere (e.g. PostgreSQL).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hook_latency import Wsgi, _percentile  # noqa: E402

from cds_service.cli.commands import request_from_bundle  # noqa: E402
from cds_service.hooks.catalogue import services  # noqa: E402
from cds_service.pipeline import answer  # noqa: E402
from cds_service.settings import Settings  # noqa: E402
from cds_service.web.app import create_app  # noqa: E402

PATIENT = ROOT / "fixtures" / "fhir" / "01-lung-high-risk-all-four.json"


class _NoAudit:
    def __init__(self, trail: Any) -> None:
        self.store = trail.store
        self._trail = trail

    def record(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trail, name)


def _apps(workdir: str) -> dict[str, Any]:
    apps = {}
    modes = (
        ("behind", True, False),
        ("before", True, True),
        ("no fsync", False, False),
        ("no audit", True, False),
    )
    for name, fsync, before in modes:
        folder = Path(workdir) / name.replace(" ", "-")
        folder.mkdir()
        url = os.environ.get("BENCH_DATABASE_URL") if name == "behind" else None
        settings = Settings(
            auth_required=False,
            database_url=url or f"sqlite:///{folder}/bench.db",
            audit_key="b" * 32,
            audit_spool_dir=str(folder / "spool"),
            audit_fsync=fsync,
            audit_sync_before_answer=before,
        )
        app = create_app(settings)
        if name == "no audit":
            app.extensions["cds.audit"] = _NoAudit(app.extensions["cds.audit"])
        apps[name] = app
    return apps


def _body(i: int) -> bytes:
    request = request_from_bundle(json.loads(PATIENT.read_text()))
    request["hookInstance"] = f"bench-{i}"
    return json.dumps(request).encode()


def sequential(apps: dict[str, Any], calls: int) -> dict[str, list[float]]:
    wsgi = {name: Wsgi(app) for name, app in apps.items()}
    times: dict[str, list[float]] = {name: [] for name in apps}
    body = _body(0)
    names = list(wsgi)
    for i in range(calls + 5):
        # The first of a round follows a gc.collect and the others' background work: rotate who it is.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            app = wsgi[name]
            gc.collect()
            status, data, ms = app.post(body)
            assert status.startswith("200"), data[:300]
            if i >= 5:  # warm-up
                times[name].append(ms)
    return times


def concurrent(apps: dict[str, Any], calls: int, threads: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in apps}
    body = _body(1)
    for name, app in apps.items():
        wsgi = Wsgi(app)
        lock = threading.Lock()

        def run(app: Wsgi = wsgi, out: list[float] = times[name], lock: threading.Lock = lock) -> None:
            for _ in range(calls // threads):
                _, _, ms = app.post(body)
                with lock:
                    out.append(ms)

        workers = [threading.Thread(target=run) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    return times


def audit_cpu(apps: dict[str, Any], calls: int, threads: int) -> dict[str, tuple[float, float]]:
    """ms of process CPU (all threads) per call for `AuditTrail.record` + forwarding, by mode and
    by number of concurrent callers (1: each record pays a whole fdatasync; more: group commit);
    with the part spent in the calling threads (record, write, fdatasync: what an answer waits on)."""
    service = services()["crc-metastases"]
    request = json.loads(_body(2))
    out = {}
    for name in ("behind", "before", "no fsync"):
        app = apps[name]
        trail = app.extensions["cds.audit"]
        outcome = answer(request, service, app.extensions["cds.settings"], _today())
        for callers in (1, threads):
            assert trail.flush()
            gc.collect()

            caller_cpu: list[float] = []

            def run(
                trail: Any = trail, outcome: Any = outcome, callers: int = callers, out: list = caller_cpu
            ) -> None:
                started = time.thread_time()
                for _ in range(calls // callers):
                    trail.record(service.id, outcome, 0.005)
                out.append(time.thread_time() - started)

            cpu0 = time.process_time()
            workers = [threading.Thread(target=run) for _ in range(callers)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            assert trail.flush(60)
            n = calls // callers * callers
            out[f"{name}, {callers} caller{'s' if callers > 1 else ''}"] = (
                (time.process_time() - cpu0) / n * 1000,
                sum(caller_cpu) / n * 1000,
            )
    return out


def _today() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC).date()


def _row(label: str, times: list[float]) -> str:
    return f"{label:<12}{statistics.median(times):>9.2f}{_percentile(times, 0.95):>9.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="audit-cost-")
    apps = _apps(workdir)
    seq = sequential(apps, args.calls)
    conc = concurrent(apps, args.calls, args.threads)
    print(
        f"demo patient 01 (one card), {args.calls} calls each, interleaved; ms until the answer's last byte"
    )
    print(f"{'':<12}{'seq p50':>9}{'seq p95':>9}   {args.threads} threads p50/p95")
    for name in apps:
        line = _row(name, seq[name])
        print(f"{line}   {statistics.median(conc[name]):>8.2f}{_percentile(conc[name], 0.95):>9.2f}")
    base = statistics.median(seq["no audit"])
    print(
        "durability cost (p50, sequential): "
        + ", ".join(
            f"{m} +{statistics.median(seq[m]) - base:.2f} ms" for m in ("behind", "before", "no fsync")
        )
    )
    print("audit CPU per call, ms (target <= 0.3): all threads (record + forwarding to the database),")
    print("and of that in the calling threads (record, write; fdatasync when it syncs before the answer)")
    for label, (cpu, callers_cpu) in audit_cpu(apps, args.calls * 3, args.threads).items():
        print(f"  {label:<24}{cpu:>7.3f}{callers_cpu:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

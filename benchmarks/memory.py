"""Resident memory over many hook calls: it must stay flat (nothing kept grows without bound).

    python benchmarks/memory.py [--calls 3000]

In-process, the app as `serve` prepares it (heap frozen, audit spool and forwarder as configured
by default), called through its WSGI callable. Calls alternate between the largest synthetic chart
(5,000 resources, 2.2 MB: over the size of a request whose answer is kept, so evaluated every
time) and a 500-resource chart of a new patient on every call (new resource ids and versions),
which fills the kept answers, validation outcomes and element models to their bounds. Prints the
process's resident memory (VmRSS) every 500 calls and its growth from call 500 to the last, where
the caches are full and only a leak would still grow. Target: flat (a few MiB of allocator noise).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hook_latency import Wsgi, _body, _unseen, synthetic_chart  # noqa: E402

from cds_service.cli.server import prepare_heap_for_serving  # noqa: E402
from cds_service.settings import Settings  # noqa: E402
from cds_service.web.app import create_app  # noqa: E402


def rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    workdir = tempfile.mkdtemp(prefix="cds-memory-")
    app = create_app(
        Settings(auth_required=False, database_url=f"sqlite:///{workdir}/bench.db", audit_key="m" * 32)
    )
    prepare_heap_for_serving()
    wsgi, audit = Wsgi(app), app.extensions["cds.audit"]
    largest = _body(synthetic_chart(5000))
    template = _unseen(synthetic_chart(500), 1)[0]
    hook_instance = template[template.index(b'"hookInstance": "') + 17 :][:36]
    marks: list[tuple[int, int]] = []
    for i in range(args.calls):
        if i % 2 == 0:
            body = largest
        else:
            call = uuid.uuid4()
            body = template.replace(hook_instance, str(call).encode())
            body = body.replace(body[body.index(b'"versionId": "') + 14 :][:32], call.hex.encode())
        status, data, _ = wsgi.post(body)
        assert status.startswith("200"), data[:300]
        if i % 100 == 99:
            audit.flush()
        if i == 0 or (i + 1) % 500 == 0:
            marks.append((i + 1, rss_mib()))
    print("calls -> resident MiB:", ", ".join(f"{n}: {m}" for n, m in marks))
    start = next((m for n, m in marks if n >= 500), marks[0][1])
    print(
        f"growth from call 500 to {marks[-1][0]}: {marks[-1][1] - start} MiB; "
        f"kept answers {len(app.extensions['cds.answers'])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

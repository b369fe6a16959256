"""Hook latency through the WSGI app vs json.loads of the same body; its targets are in the README.

    python benchmarks/hook_latency.py [--repeat N]

Builds in-scope charts of 50, 500 and 5,000 resources (a colorectal cancer with a lung metastasis,
its staging, CEA history, and many unrelated labs, conditions and procedures), sends each as a
full-prefetch patient-view call to the Flask app's WSGI callable (as a WSGI server calls it), and
prints the median and p95 latency until the answer's last byte (when the server sends it and the
EHR has it) beside the median of `json.loads` of the same request body, measured in the same run.
What the server does after sending, the response's `close()` (where the service frees the parsed
request), is timed apart ("close ms").
Then the same for the largest real Synthea charts of ../shared/fhir-external (skipped when absent).
Each chart is sent on every call with the same content, as an EHR sends a chart each time it is
opened (the service answers it from its kept cards); the "never seen" rows send a chart whose
resources are new on every call (new ids and versions: only what new patients share, such as
codes, can be reused), as for a patient never seen before.
Targets on the 2-core reference machine: 50 resources median <= 3 ms; 500 and 5,000 resources
median <= 2x json.loads; cost linear in chart size.

Each call spools its audit record as the service does (appended and fdatasync'd before the answer,
so inside the latency); the forwarder's copy into a throwaway SQLite file (synchronous=FULL) after
the answer is timed apart ("audit ms", one record a batch: the worst case) before the next call.
BENCH_DATABASE_URL=sqlite:// uses an in-memory store instead. benchmarks/audit_cost.py sets the
spool's cost beside no audit at all, and the audit CPU per call.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import io
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from werkzeug.test import EnvironBuilder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cds_service.cli.commands import request_from_bundle  # noqa: E402
from cds_service.cli.server import prepare_heap_for_serving  # noqa: E402
from cds_service.settings import Settings  # noqa: E402
from cds_service.store.audit import AuditTrail  # noqa: E402
from cds_service.web.app import create_app  # noqa: E402

SHARED = ROOT.parent / "shared" / "fhir-external"
URL = "/cds-services/crc-metastases"


def _ref(pid: str) -> dict:
    return {"reference": f"Patient/{pid}"}


def synthetic_chart(n: int) -> dict:
    """An in-scope chart of about `n` resources; the clinically relevant ones are a handful."""
    pid = f"bench-{n}"
    core = [
        {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1960-01-01"},
        {
            "resourceType": "Condition",
            "id": "crc",
            "subject": _ref(pid),
            "onsetDateTime": "2020-01-10",
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C18.7"}]},
        },
        {
            "resourceType": "Condition",
            "id": "lungmet",
            "subject": _ref(pid),
            "onsetDateTime": "2021-05-01",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "94391008"}]},
        },
        {
            "resourceType": "Procedure",
            "id": "resection",
            "status": "completed",
            "subject": _ref(pid),
            "performedDateTime": "2020-02-01",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "84604002"}]},
        },
        {
            "resourceType": "Observation",
            "id": "pn",
            "status": "final",
            "subject": _ref(pid),
            "effectiveDateTime": "2020-02-08",
            "code": {"coding": [{"system": "http://loinc.org", "code": "21900-6"}]},
            "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "1229951001"}]},
        },
    ]
    out = list(core)
    i = 0
    while len(out) < n:
        i += 1
        day = f"20{17 + i % 6}-{1 + i % 12:02d}-{1 + i % 28:02d}"
        kind = i % 10
        if kind == 0:
            out.append(
                {
                    "resourceType": "Observation",
                    "id": f"cea-{i}",
                    "status": "final",
                    "subject": _ref(pid),
                    "effectiveDateTime": day,
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2039-6"}]},
                    "valueQuantity": {
                        "value": 2 + i % 9,
                        "unit": "ng/mL",
                        "system": "http://unitsofmeasure.org",
                        "code": "ng/mL",
                    },
                }
            )
        elif kind < 8:
            out.append(
                {
                    "resourceType": "Observation",
                    "id": f"lab-{i}",
                    "status": "final",
                    "subject": _ref(pid),
                    "effectiveDateTime": day,
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "laboratory",
                                }
                            ]
                        }
                    ],
                    "code": {
                        "coding": [
                            {
                                "system": "http://loinc.org",
                                "code": "718-7",
                                "display": "Hemoglobin [Mass/volume] in Blood",
                            }
                        ]
                    },
                    "valueQuantity": {
                        "value": 13.1,
                        "unit": "g/dL",
                        "system": "http://unitsofmeasure.org",
                        "code": "g/dL",
                    },
                }
            )
        elif kind == 8:
            out.append(
                {
                    "resourceType": "Condition",
                    "id": f"cond-{i}",
                    "subject": _ref(pid),
                    "onsetDateTime": day,
                    "code": {
                        "coding": [
                            {
                                "system": "http://snomed.info/sct",
                                "code": "38341003",
                                "display": "Hypertensive disorder",
                            }
                        ]
                    },
                }
            )
        else:
            out.append(
                {
                    "resourceType": "Procedure",
                    "id": f"proc-{i}",
                    "status": "completed",
                    "subject": _ref(pid),
                    "performedDateTime": day,
                    "code": {
                        "coding": [
                            {
                                "system": "http://snomed.info/sct",
                                "code": "430193006",
                                "display": "Medication reconciliation",
                            }
                        ]
                    },
                }
            )
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in out]}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Wsgi:
    """POSTs a body to a WSGI app the way a server does: an environ in, the body iterated and closed.

    A Flask test client would add its own request building and response parsing (~0.3 ms a call)
    to what is measured; a WSGI server such as gunicorn does that work in its place.

    `post` times the call up to its answer's last byte, which is when a server has sent it and
    the EHR has it; the iterable's `close()`, which a server calls after sending (the service
    frees the parsed request there), is timed apart in `closed_ms`.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.closed_ms = 0.0

    def post(self, body: bytes) -> tuple[str, bytes, float]:
        """(status, answer, ms until the answer's last byte)."""
        environ = {
            **_BASE_ENVIRON,
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
        }
        status: list[str] = []
        t0 = time.perf_counter()
        result = self.app(environ, lambda s, _headers, _exc=None: status.append(s))
        try:
            data = b"".join(result)
            answered = time.perf_counter()
        finally:
            if hasattr(result, "close"):
                result.close()
        self.closed_ms = (time.perf_counter() - answered) * 1000
        return status[0], data, (answered - t0) * 1000


_BASE_ENVIRON = EnvironBuilder(path=URL, method="POST", content_type="application/json").get_environ()


def floor_app() -> Wsgi:
    """The HTTP floor: a Flask app that only parses the body and answers no cards."""
    from flask import Flask, Response, request

    floor = Flask("floor")

    @floor.post(URL)
    def parse_only() -> Response:
        json.loads(request.get_data())
        return Response('{"cards":[]}', content_type="application/json")

    return Wsgi(floor)


def timed(app: Wsgi, body: bytes, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        times.append(app.post(body)[2])
    return statistics.median(times)


@dataclass
class Figures:
    median: float
    p95: float
    parse: float  # json.loads of the same body, median
    closed: float  # the response's close() after its last byte, median
    audit: float  # the audit write behind the answer, median
    cards: int


def measure(app: Wsgi, audit: AuditTrail, bodies: list[bytes], repeat: int) -> Figures:
    """`bodies`: one request sent on every call, or one per call (warm-up first)."""
    calls = iter(bodies * (repeat + 3) if len(bodies) == 1 else bodies)
    for _ in range(3):  # warm-up: imports, caches, templates
        status, data, _ = app.post(next(calls))
        assert status.startswith("200"), data[:300]
    hook, parse, closed, written = [], [], [], []
    cards = 0
    for _ in range(repeat):
        # Each timing starts from a collected heap, so one side does not pay for the other's garbage,
        # and with the previous call's audit record written: the writer thread would otherwise take
        # the GIL in the middle of the next call (a server that is not saturated is idle by then).
        body = next(calls)
        gc.collect()
        _, data, ms = app.post(body)
        hook.append(ms)
        closed.append(app.closed_ms)
        t0 = time.perf_counter()
        audit.flush()
        written.append((time.perf_counter() - t0) * 1000)
        cards = len(json.loads(data)["cards"])
        gc.collect()
        t0 = time.perf_counter()
        json.loads(body)
        parse.append((time.perf_counter() - t0) * 1000)
    median = statistics.median
    return Figures(
        median(hook), _percentile(hook, 0.95), median(parse), median(closed), median(written), cards
    )


def _body(bundle: dict) -> bytes:
    request = request_from_bundle(bundle)
    request["hookInstance"] = str(uuid.uuid4())
    return json.dumps(request).encode()


def as_new_patient(request: dict, mark: str) -> None:
    """Make every resource of the request's prefetch but the Patient a resource never sent before,
    once `mark` (in the text) is replaced by 32 new hex digits on each call: its id (and every
    reference to it) becomes `r<n>-<mark>` and its meta.versionId `mark`. A new meta.versionId alone
    is not enough: the service keeps what it validated by the elements it reads, which do not
    include meta. Codes, statuses and dates stay, as new patients share them."""
    request["prefetch"] = json.loads(json.dumps(request["prefetch"]))  # the bundle's own stay as they are
    renamed: dict[str, str] = {}
    resources = [
        entry["resource"]
        for key, value in request["prefetch"].items()
        if key != "patient"
        for entry in value["entry"]
    ]
    for n, resource in enumerate(resources):
        if isinstance(resource.get("id"), str):
            new = f"r{n}-{mark}"
            renamed[f"{resource['resourceType']}/{resource['id']}"] = f"{resource['resourceType']}/{new}"
            renamed[f"urn:uuid:{resource['id']}"] = f"urn:uuid:{new}"
            resource["id"] = new
        resource["meta"] = {**resource.get("meta", {}), "versionId": mark}

    def rename(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        return renamed.get(value, value) if isinstance(value, str) else value

    for value in request["prefetch"].values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            value["entry"] = rename(value["entry"])


def _unseen(bundle: dict, calls: int) -> list[bytes]:
    """One request per call, each with its own hookInstance and every resource but the Patient new
    (as_new_patient): nothing computed for a request or a resource on an earlier call can be reused
    (a new patient's chart). The default rows send the same chart on every call with a new
    hookInstance, as an EHR does each time the chart is opened."""
    request = request_from_bundle(bundle)
    request["hookInstance"] = "00000000-0000-4000-8000-00000000beef"
    as_new_patient(request, "bench-version")
    template = json.dumps(request)
    out = []
    for _ in range(calls):
        call = uuid.uuid4()
        out.append(
            template.replace("00000000-0000-4000-8000-00000000beef", str(call))
            .replace("bench-version", call.hex)
            .encode()
        )
    return out


def _real_charts() -> list[tuple[str, dict]]:
    if not SHARED.is_dir():
        return []
    paths = sorted(SHARED.glob("synthea-smart/*/*.json.gz"), key=lambda p: p.stat().st_size, reverse=True)[:3]
    return [
        (p.name.split("_")[0] + " " + p.name.split("_")[1], json.loads(gzip.decompress(p.read_bytes())))
        for p in paths
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()
    # The real path, audit record included, in a throwaway SQLite file (not the working directory).
    workdir = tempfile.mkdtemp(prefix="hook-latency-")
    settings = Settings(
        auth_required=False,
        database_url=os.environ.get("BENCH_DATABASE_URL", f"sqlite:///{workdir}/bench.db"),
        audit_key="b" * 32,
    )
    # The requests as bytes: the charts' dicts are not kept, so the collector run before each
    # timing walks the service's heap only, not the harness's (as in a server).
    rows = [(f"synthetic {n}", n, [_body(synthetic_chart(n))]) for n in (50, 500, 5000)]
    rows += [
        (f"synthetic {n}, never seen", n, _unseen(synthetic_chart(n), args.repeat + 3)) for n in (50, 500)
    ]
    if not SHARED.is_dir():
        print(f"(real Synthea charts skipped: {SHARED} is absent)")
    rows += [(f"synthea {name}", len(chart["entry"]), [_body(chart)]) for name, chart in _real_charts()]
    flask_app = create_app(settings)
    floor = floor_app()
    prepare_heap_for_serving()  # as `cds-service serve` does before its workers start
    app, audit = Wsgi(flask_app), flask_app.extensions["cds.audit"]
    print(
        f"{'chart':<27}{'resources':>10}{'body KB':>8}{'median ms':>10}{'p95 ms':>8}"
        f"{'json.loads ms':>14}{'ratio':>7}{'floor ms':>9}{'close ms':>9}{'audit ms':>9}{'cards':>6}"
    )
    for label, resources, bodies in rows:
        repeat = args.repeat if len(bodies[0]) < 2_000_000 else args.repeat // 2
        f = measure(app, audit, bodies, repeat)
        floor_ms = timed(floor, bodies[0], repeat)
        print(
            f"{label:<27}{resources:>10}{len(bodies[0]) // 1024:>8}{f.median:>10.2f}{f.p95:>8.2f}"
            f"{f.parse:>14.2f}{f.median / f.parse:>7.2f}{floor_ms:>9.2f}{f.closed:>9.2f}{f.audit:>9.2f}{f.cards:>6}"
        )
    print(
        "ratio = median / json.loads of the same body; floor = a Flask app that only parses the body;\n"
        "each row sends the same chart on every call (as an EHR does each time the chart is opened),\n"
        "'never seen' a new one on every call (new hookInstance and resource versions: nothing reused);\n"
        "close = the response's close() after its last byte is sent (frees the parsed request);\n"
        "audit = forwarding the spooled record to the database after the answer (not part of the latency)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

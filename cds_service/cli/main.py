"""`cds-service serve | demo | evaluate` (service contract §1)."""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cds_service.errors import ServiceError
from cds_service.hooks.catalogue import services
from cds_service.jsonio import dumps, loads
from cds_service.settings import Settings
from cds_service.telemetry.logs import configure_logging


class CliError(Exception):
    """Bad input to a command: one line on stderr, exit 2."""


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        field = "CDS_" + str(err["loc"][0]).upper() if err.get("loc") else "configuration"
        raise CliError(f"invalid configuration {field}: {err['msg'].removeprefix('Value error, ')}") from None


# --- serve / demo ---------------------------------------------------------------------------------


def _gunicorn(app: Any, host: str, port: int, workers: int, threads: int) -> None:
    from gunicorn.app.base import BaseApplication

    from cds_service.store import audit
    from cds_service.telemetry import metrics
    from cds_service.telemetry.logs import gunicorn_logconfig

    def child_exit(_server: Any, worker: Any) -> None:
        metrics.worker_exited(worker.pid)

    def worker_exit(_server: Any, _worker: Any) -> None:
        # In the worker, as it stops: its queued audit records are written before it goes.
        audit.close_all()

    class _App(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", 60)
            self.cfg.set("accesslog", None)
            self.cfg.set("logconfig_dict", gunicorn_logconfig(_log_level(), json_lines=_json_logs("serve")))
            self.cfg.set("child_exit", child_exit)
            self.cfg.set("worker_exit", worker_exit)
            # Extra settings for operators, e.g. GUNICORN_CMD_ARGS="--workers 4 --keep-alive 5".
            for key, value in (
                self.cfg.parser().parse_args(os.environ.get("GUNICORN_CMD_ARGS", "").split()).__dict__.items()
            ):
                if value is not None and key in self.cfg.settings and key != "args":
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return app

    prepare_heap_for_serving()
    _App().run()


# Young-generation collections start after this many new container objects (CPython's default is
# 700). Parsing one 500-resource chart creates ~12,000 dicts and lists that are freed by reference
# counting anyway; at 700, a call paid for ~15 young collections that found nothing to free
# (~0.1 ms of a 2.6 ms call). Cyclic garbage still goes, in a batch that stays a few MB at most.
YOUNG_GC_THRESHOLD = 10_000


def prepare_heap_for_serving() -> None:
    """Freeze the startup heap and space out young collections, before gunicorn forks.

    Freezing moves everything loaded so far (modules, FHIR models, schemas, templates) out of the
    GC's reach. The loaded app is some 120,000 long-lived objects; every full collection would
    walk them all (~45 ms, a pause any request then waits out, and caches left cold). Frozen before
    gunicorn forks, they are also never written to by a worker's collector, so their memory pages
    stay shared between the workers (the pattern the `gc.freeze` documentation describes).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)


def _create_app(settings: Settings, **kwargs: Any) -> Any:
    """The app for gunicorn, its store open and migrated; metrics shared by all workers."""
    from cds_service.store.database import StoreError
    from cds_service.telemetry.logs import prepare_metrics_dir, remove_metrics_dir_at_exit

    remove_metrics_dir_at_exit(prepare_metrics_dir())  # before the app imports prometheus_client
    from cds_service.web.app import create_app

    try:
        return create_app(settings, **kwargs)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    settings = _settings()
    if settings.auth_required and not settings.public_base_url:
        # Without it the JWT aud would be checked against the request's Host header, which the
        # caller chooses: a token minted for another host would pass.
        raise CliError(
            "set CDS_PUBLIC_BASE_URL to the URL EHRs call (client JWTs name it in aud), "
            "or CDS_AUTH_REQUIRED=false on a trusted network"
        )
    app = _create_app(settings)
    _gunicorn(app, args.host, args.port, args.workers, args.threads)
    return 0


def demo_resources() -> list[dict[str, Any]]:
    from cds_service.paths import data_dir

    resources: list[dict[str, Any]] = []
    for path in sorted(data_dir("fixtures").glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("resourceType") == "Bundle":
            resources.extend(
                e["resource"] for e in doc.get("entry", []) if isinstance(e.get("resource"), dict)
            )
    return resources


def _demo(args: argparse.Namespace) -> int:
    settings = _settings(auth_required=False, demo=True, preview=True)
    resources = demo_resources()
    base = f"http://{args.host}:{args.port}"
    service = next(iter(services().values()))
    patients = [r["id"] for r in resources if r.get("resourceType") == "Patient"]
    banner = [
        "=" * 78,
        "DEMO MODE: client JWT checking is OFF and the embedded demo patients are served at",
        f"{base}/fhir. Never expose this to real patient data.",
        "=" * 78,
        f"Card preview (pick a demo patient, see the cards as an EHR shows them): {base}/",
        f"Discovery:  curl -s {base}/cds-services",
        f"{len(patients)} demo patients. Ready-to-run hook calls (the service reads the demo FHIR server):",
    ]
    for pid in patients:
        body = {
            "hook": service.hook,
            "hookInstance": str(uuid.uuid5(uuid.NAMESPACE_URL, pid)),
            "fhirServer": f"{base}/fhir",
            "fhirAuthorization": {
                "access_token": "demo",
                "token_type": "Bearer",
                "expires_in": 3600,
                "scope": "patient/*.read",
                "subject": "demo",
            },
            "context": {"patientId": pid, "userId": "Practitioner/demo"},
        }
        banner.append(
            f"curl -s -X POST {base}/cds-services/{service.id} -H 'Content-Type: application/json' "
            f"-d '{json.dumps(body, separators=(',', ':'))}'"
        )
    print("\n".join(banner), flush=True)
    app = _create_app(settings, demo_resources=resources)
    _gunicorn(app, args.host, args.port, 1, 8)
    return 0


# --- evaluate -------------------------------------------------------------------------------------


def request_from_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    """A complete patient-view request whose prefetch holds the Bundle's chart, as an EHR would send."""
    service = next(iter(services().values()))
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        raise CliError("the Bundle has no entry list")
    resources = [
        e.get("resource") for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]
    patients = [r for r in resources if r.get("resourceType") == "Patient"]
    if not patients or not isinstance(patients[0].get("id"), str):
        raise CliError("the Bundle holds no Patient with an id")
    _resolve_full_urls(entries)
    patient = patients[0]
    by_key: dict[str, list[dict[str, Any]]] = {k: [] for k in service.search_keys}
    for resource in resources:
        key = service.key_for(str(resource.get("resourceType")))
        if key is not None:
            by_key[key].append({"resource": resource})
    prefetch: dict[str, Any] = {"patient": patient}
    for key, entry in by_key.items():
        prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "total": len(entry), "entry": entry}
    digest = hashlib.sha256(dumps(bundle).encode()).hexdigest()
    return {
        "hook": service.hook,
        "hookInstance": str(uuid.uuid5(uuid.NAMESPACE_URL, f"evaluate:{digest}")),
        "context": {"patientId": patient["id"]},
        "prefetch": prefetch,
    }


def _resolve_full_urls(entries: list[Any]) -> None:
    """Point references at `Type/id`, as a FHIR server's search results do.

    A transaction or document Bundle (Synthea's, say) links its resources by `fullUrl`, often
    `urn:uuid:…`, which a prefetch search never holds: without this, `subject: urn:uuid:…` would
    name no patient of the chart, and a TumorSize's focus no Tumor.
    """
    by_url = {
        e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("fullUrl"), str)
        and isinstance(e.get("resource"), dict)
        and isinstance(e["resource"].get("id"), str)
        and isinstance(e["resource"].get("resourceType"), str)
    }
    if not by_url:
        return

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            ref = value.get("reference")
            if isinstance(ref, str) and ref in by_url:
                value["reference"] = by_url[ref]
            for item in value.values():
                if isinstance(item, dict | list):
                    visit(item)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict | list):
                    visit(item)

    for entry in entries:
        if isinstance(entry, dict):
            visit(entry.get("resource"))


def _read_json(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _evaluate(args: argparse.Namespace) -> int:
    from cds_service.pipeline import answer

    settings = _settings()
    service = next(iter(services().values()))
    today = dt.datetime.now(dt.UTC).date()
    if args.fhir_server:
        return _evaluate_fhir_server(args, service, settings, today)
    if not args.paths:
        raise CliError("give PATH(s), or --fhir-server URL --patient ID")
    outputs = []
    for path in args.paths:
        doc = _read_json(path)
        if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
            body = request_from_bundle(doc)
        elif isinstance(doc, dict) and "hook" in doc and "resourceType" not in doc:
            body = doc
        else:
            raise CliError(f"{path}: neither a FHIR Bundle nor a CDS Hooks request")
        try:
            outcome = answer(body, service, settings, today)
        except ServiceError as exc:
            raise CliError(f"{path}: {exc.diagnostics}") from None
        outputs.append(dumps(outcome.answer))
    for out in outputs:
        print(out)
    return 0


def _evaluate_fhir_server(args: argparse.Namespace, service: Any, settings: Settings, today: dt.date) -> int:
    """Cards for one patient read from a live FHIR server (no prefetch), and what was fetched."""
    from cds_service.pipeline import answer

    if not args.patient:
        raise CliError("--fhir-server needs --patient ID")
    body: dict[str, Any] = {
        "hook": service.hook,
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": args.fhir_server,
        "context": {"patientId": args.patient},
    }
    if args.token:
        body["fhirAuthorization"] = {
            "access_token": args.token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds-service-evaluate",
        }
    from cds_service.fetch.client import FetchFailed, PatientNotFound

    try:
        outcome = answer(body, service, settings, today)
    except PatientNotFound as exc:  # one line says it all
        raise CliError(exc.diagnostics) from None
    except FetchFailed as exc:  # what was read and what failed, then the reason
        _print_fetch_report(args.fhir_server, exc.report)
        raise CliError(exc.diagnostics) from None
    except ServiceError as exc:
        raise CliError(exc.diagnostics) from None
    print(dumps(outcome.answer))
    if outcome.source.report is not None:
        _print_fetch_report(args.fhir_server, outcome.source.report)
    return 0


def _print_fetch_report(fhir_server: str, report: Any) -> None:
    # The account goes to stderr: stdout stays one JSON document.
    lines = [f"fetched from {fhir_server} in {report.seconds * 1000:.0f} ms:"]
    lines += [
        f"  {s.key:<26} {s.resources:>5} resource(s) {s.pages:>3} page(s) {s.seconds * 1000:>7.0f} ms  {s.outcome}"
        for s in report.searches
    ]
    print("\n".join(lines), file=sys.stderr)


# --- report / migrate -------------------------------------------------------------------------------


def _open_existing_store(settings: Settings) -> Any:
    from sqlalchemy.engine import make_url

    from cds_service.store.database import StoreError, open_store

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise CliError(f"no database at {url.database} (CDS_DATABASE_URL)")
    try:
        return open_store(settings)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def _report(args: argparse.Namespace) -> int:
    from cds_service.store.report import as_csv, as_table, build_report, parse_since

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    report = build_report(_open_existing_store(_settings()), since)
    sys.stdout.write(as_csv(report) if args.format == "csv" else as_table(report))
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    from cds_service.store.database import StoreError, open_store

    try:
        counts = open_store(_settings()).counts()
    except StoreError as exc:
        raise CliError(str(exc)) from None
    print("database schema at head: " + ", ".join(f"{table} {n} rows" for table, n in counts.items()))
    return 0


# --- entry point ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cds-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the CDS service with gunicorn (configuration from CDS_* env)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=int(os.environ.get("CDS_WORKERS", "2")))
    serve.add_argument("--threads", type=int, default=int(os.environ.get("CDS_THREADS", "8")))
    serve.set_defaults(func=_serve)
    demo = sub.add_parser("demo", help="serve on the embedded demo patients (auth off)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.set_defaults(func=_demo)
    evaluate = sub.add_parser("evaluate", help="print the cards for FHIR Bundle or hook-request files")
    evaluate.add_argument("paths", nargs="*", metavar="PATH")
    evaluate.add_argument(
        "--fhir-server", metavar="URL", help="read the chart from this FHIR R4 server instead"
    )
    evaluate.add_argument("--patient", metavar="ID", help="the patient id on --fhir-server")
    evaluate.add_argument("--token", metavar="T", help="bearer token for --fhir-server")
    evaluate.set_defaults(func=_evaluate)
    report = sub.add_parser(
        "report", help="calls, cards, acceptance and override rates, latency from the store"
    )
    report.add_argument(
        "--since", metavar="DATE", help="only hook calls answered since DATE (YYYY-MM-DD, UTC)"
    )
    report.add_argument("--format", choices=("table", "csv"), default="table")
    report.set_defaults(func=_report)
    migrate = sub.add_parser("migrate", help="bring the store's schema to head (serve also does it at start)")
    migrate.set_defaults(func=_migrate)
    return parser


def _log_level() -> str:
    return os.environ.get("CDS_LOG_LEVEL", "INFO")


def _json_logs(command: str) -> bool:
    """CDS_LOG_FORMAT=json|text; JSON lines by default for the servers, text for the tools."""
    default = "json" if command in ("serve", "demo") else "text"
    return os.environ.get("CDS_LOG_FORMAT", default).strip().lower() == "json"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(
        os.environ.get("CDS_LOG_LEVEL", "WARNING" if args.command in ("evaluate", "report") else "INFO"),
        json_lines=_json_logs(args.command),
    )
    if args.command in ("evaluate", "report"):
        logging.disable(logging.WARNING)  # their stderr is for a one-line error only
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"cds-service {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line for the user, not a traceback
        print(f"cds-service {args.command}: internal error ({type(exc).__name__})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

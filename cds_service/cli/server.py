"""`cds-service serve` and `cds-service demo`: the Flask app under gunicorn."""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import uuid
from typing import Any

from cds_service import card_ids
from cds_service.cli.common import CliError
from cds_service.cli.fixtures import demo_resources
from cds_service.hooks.catalogue import services
from cds_service.settings import Settings
from cds_service.urls import listen_url

log = logging.getLogger("cds_service.cli")

# Young-generation collections start after this many new container objects (CPython's default is
# 700). Parsing one 500-resource chart creates 5,000-8,000 dicts and lists that reference counting
# frees anyway. A young collection walks every chart still held by the worker's other threads (a
# gthread worker answers up to 8 at once) and moves them on to older generations, to be walked
# again there: at 10,000, under saturation, collections that found nothing to free cost ~1.2 ms of
# a 6 ms call. At 64,000 a worker's threads can each hold a 500-resource chart without one.
# Cyclic garbage still goes, in a batch of a few MB at most.
YOUNG_GC_THRESHOLD = 64_000


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


def run_gunicorn(
    app: Any, settings: Settings, command: str, *, host: str, port: int, workers: int, threads: int
) -> None:
    from gunicorn.app.base import BaseApplication

    from cds_service.cli.worker import AppLogs, Worker
    from cds_service.store import audit
    from cds_service.telemetry import metrics
    from cds_service.telemetry.logs import gunicorn_logconfig

    def child_exit(_server: Any, worker: Any) -> None:
        metrics.worker_exited(worker.pid)

    def worker_exit(_server: Any, _worker: Any) -> None:
        # In the worker, as it stops: its queued audit records are written before it goes.
        audit.close_all()

    logconfig = gunicorn_logconfig(settings.level_for(command), json_lines=settings.json_logs_for(command))

    class _App(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", Worker)  # gthread, answering what it refuses in FHIR
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", 60)
            self.cfg.set("accesslog", None)
            self.cfg.set("logger_class", AppLogs)
            if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25.1 opens one by default
                self.cfg.set("control_socket_disable", True)
            self.cfg.set("logconfig_dict", logconfig)
            self.cfg.set("child_exit", child_exit)
            self.cfg.set("worker_exit", worker_exit)
            # Extra settings for operators, e.g. GUNICORN_CMD_ARGS="--workers 4 --keep-alive 5".
            given = self.cfg.parser().parse_args(os.environ.get("GUNICORN_CMD_ARGS", "").split())
            for key, value in given.__dict__.items():
                if value is not None and key in self.cfg.settings and key != "args":
                    self.cfg.set(key, value)
            if getattr(given, "control_socket", None) and not getattr(given, "control_socket_disable", None):
                self.cfg.set("control_socket_disable", False)  # a path asked for: the operator wants it

        def load(self) -> Any:
            return app

    prepare_heap_for_serving()
    _App().run()


def create_served_app(settings: Settings, **kwargs: Any) -> Any:
    """The app for gunicorn, its store open and migrated; metrics shared by all workers."""
    from cds_service.store.database import StoreError
    from cds_service.telemetry.logs import prepare_metrics_dir, remove_metrics_dir_at_exit

    remove_metrics_dir_at_exit(prepare_metrics_dir())  # before the app imports prometheus_client
    from cds_service.web.app import create_app

    try:
        return create_app(settings, **kwargs)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def record_served_base(settings: Settings, host: str, port: int) -> None:
    """Note in the store where this server answers (CDS_PUBLIC_BASE_URL, else where it listens), so
    that `cds-service evaluate` on the same database links the evidence pages as its cards do."""
    from cds_service.store.database import StoreError, open_store

    base = settings.public_base_url or listen_url(host, port)
    # Without CDS_AUDIT_KEY the run signs card uuids with a random key: evaluate needs it to mint the
    # same uuids (only the derived signing key is stored, never the secret behind the patient hashes).
    card_key = card_ids.signing_key() if settings.audit_key is None else None
    try:
        open_store(settings).record_served_base(base, card_key)
    except StoreError as exc:  # StoreDown included: evaluate then falls back to its default
        log.warning("could not record the served base URL in the store: %s", exc)


def serve(args: argparse.Namespace, settings: Settings) -> int:
    if settings.auth_required and not settings.public_base_url:
        # Without it the JWT aud would be checked against the request's Host header, which the
        # caller chooses: a token minted for another host would pass.
        raise CliError(
            "set CDS_PUBLIC_BASE_URL to the URL EHRs call (client JWTs name it in aud), "
            "or CDS_AUTH_REQUIRED=false on a trusted network"
        )
    threads = args.threads or settings.threads
    app = create_served_app(with_fhir_call_limit(settings, threads))
    record_served_base(settings, args.host, args.port)
    run_gunicorn(
        app,
        settings,
        "serve",
        host=args.host,
        port=args.port,
        workers=args.workers or settings.workers,
        threads=threads,
    )
    return 0


def with_fhir_call_limit(settings: Settings, threads: int) -> Settings:
    """Unless CDS_MAX_FHIR_CALLS says otherwise, a worker keeps one thread free of FHIR-bound calls."""
    if settings.max_fhir_calls is not None:
        return settings
    return settings.model_copy(update={"max_fhir_calls": max(1, threads - 1)})


def demo(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.model_copy(update={"auth_required": False, "demo": True, "preview": True})
    # Dates as if the stories happened lately (see cli/fixtures.py); `evaluate FILE` reads them as written.
    resources = demo_resources(shift_to=dt.datetime.now(dt.UTC).date())
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
    app = create_served_app(with_fhir_call_limit(settings, 8), demo_resources=resources)
    record_served_base(settings, args.host, args.port)
    run_gunicorn(app, settings, "demo", host=args.host, port=args.port, workers=1, threads=8)
    return 0

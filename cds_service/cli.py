"""`cds-service serve | demo | evaluate` (service contract §1)."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .catalog import services
from .errors import ServiceError
from .protocol import dumps
from .settings import Settings


class CliError(Exception):
    """Bad input to a command: one line on stderr, exit 2."""


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        field = "CDS_" + str(err["loc"][0]).upper() if err.get("loc") else "configuration"
        raise CliError(f"invalid configuration {field}: {err['msg']}") from None


# --- serve / demo ---------------------------------------------------------------------------------


def _gunicorn(app: Any, host: str, port: int, workers: int, threads: int) -> None:
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", 60)
            self.cfg.set("accesslog", None)
            # Extra settings for operators, e.g. GUNICORN_CMD_ARGS="--workers 4 --keep-alive 5".
            for key, value in (
                self.cfg.parser().parse_args(os.environ.get("GUNICORN_CMD_ARGS", "").split()).__dict__.items()
            ):
                if value is not None and key in self.cfg.settings and key != "args":
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return app

    _App().run()


def _serve(args: argparse.Namespace) -> int:
    from .app import create_app

    settings = _settings()
    app = create_app(settings)
    _gunicorn(app, args.host, args.port, args.workers, args.threads)
    return 0


def demo_resources() -> list[dict[str, Any]]:
    from .paths import data_dir

    resources: list[dict[str, Any]] = []
    for path in sorted(data_dir("fixtures").glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("resourceType") == "Bundle":
            resources.extend(
                e["resource"] for e in doc.get("entry", []) if isinstance(e.get("resource"), dict)
            )
    return resources


def _demo(args: argparse.Namespace) -> int:
    from .app import create_app

    settings = _settings(auth_required=False, demo=True)
    resources = demo_resources()
    base = f"http://{args.host}:{args.port}"
    service = next(iter(services().values()))
    patients = [r["id"] for r in resources if r.get("resourceType") == "Patient"]
    banner = [
        "=" * 78,
        "DEMO MODE: client JWT checking is OFF and the embedded demo patients are served at",
        f"{base}/fhir. Never expose this to real patient data.",
        "=" * 78,
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
    app = create_app(settings, demo_resources=resources)
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
    patient = patients[0]
    by_key: dict[str, list[dict[str, Any]]] = {k: [] for k in service.search_keys}
    for resource in resources:
        template = service.prefetch
        for key in service.search_keys:
            if template[key].split("?", 1)[0] == resource.get("resourceType"):
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


def _read_json(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _evaluate(args: argparse.Namespace) -> int:
    from .engine import answer

    settings = _settings()
    service = next(iter(services().values()))
    today = dt.datetime.now(dt.UTC).date()
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
    evaluate.add_argument("paths", nargs="+", metavar="PATH")
    evaluate.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("CDS_LOG_LEVEL", "WARNING" if args.command == "evaluate" else "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "evaluate":
        logging.disable(logging.WARNING)  # evaluate's stderr is for its one-line error only
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"cds-service {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

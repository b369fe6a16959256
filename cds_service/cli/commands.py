"""`cds-service evaluate | report | migrate`: the service's answer and its store, without a server."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cds_service.cli.common import CliError
from cds_service.errors import ServiceError, operation_outcome
from cds_service.hooks.catalogue import Service, services
from cds_service.jsonio import dumps, loads
from cds_service.settings import Settings

if TYPE_CHECKING:
    from cds_service.store.report import Report

# --- evaluate -------------------------------------------------------------------------------------


def request_from_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    """A complete patient-view request whose prefetch holds the Bundle's chart, as an EHR would send."""
    service = next(iter(services().values()))
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        raise CliError("the Bundle has no entry list")
    resources: list[dict[str, Any]] = [
        e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)
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


# Any input file, and a gzip file once decompressed, is read whole: this bounds the memory one costs.
MAX_INPUT_BYTES = 128 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"


def _read_input(path: str) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by its first bytes, whatever its name)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise CliError(f"cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise CliError(f"larger than {MAX_INPUT_BYTES // 2**20} MiB")
    return _gunzip(raw) if raw.startswith(_GZIP_MAGIC) else raw


def _gunzip(raw: bytes) -> bytes:
    out: list[bytes] = []
    size = 0
    while raw:  # `gzip -c a b` writes one member per file
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(raw, MAX_INPUT_BYTES + 1 - size)
        except zlib.error:
            raise CliError("not a readable gzip file") from None
        size += len(chunk)
        if size > MAX_INPUT_BYTES or inflater.unconsumed_tail:
            raise CliError(f"larger than {MAX_INPUT_BYTES // 2**20} MiB once decompressed")
        if not inflater.eof:
            raise CliError("a truncated gzip file")
        out.append(chunk)
        raw = inflater.unused_data
    return out[0] if len(out) == 1 else b"".join(out)


def _request_from_file(path: str) -> dict[str, Any]:
    try:
        doc = loads(_read_input(path))
    except json.JSONDecodeError as exc:
        where = f" at line {exc.lineno}" if exc.doc else ""
        raise CliError(f"not valid JSON ({exc.msg}{where})") from None
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        return request_from_bundle(doc)
    if isinstance(doc, dict) and "hook" in doc and "resourceType" not in doc:
        return doc
    raise CliError("neither a FHIR Bundle nor a CDS Hooks request")


def evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """One JSON document per PATH on stdout, in the order given (see the `evaluate --help` epilog).

    Every file is answered on its own: a bad one is reported (stderr, and in its place on stdout when
    there are several) and the others still answered. Exit 2 when any input was bad, 1 on a bug.
    """
    from cds_service.pipeline import answer

    service = next(iter(services().values()))
    today = dt.datetime.now(dt.UTC).date()
    if args.fhir_server:
        return _evaluate_fhir_server(args, service, settings, today)
    if not args.paths:
        raise CliError("give PATH(s), or --fhir-server URL --patient ID")
    several = len(args.paths) > 1
    status = 0
    base_url = as_the_service(settings)
    for path in args.paths:
        try:
            body = _request_from_file(path)
            line = answer(body, service, settings, today, base_url=base_url).minted.json.decode()
        except (CliError, ServiceError) as exc:
            reason = exc.diagnostics if isinstance(exc, ServiceError) else str(exc)
            status = status or 2
            code = exc.issue_code if isinstance(exc, ServiceError) else "invalid"
            line = dumps(operation_outcome(f"{path}: {reason}", code))
            print(f"cds-service evaluate: {path}: {reason}", file=sys.stderr, flush=True)
            if not (several or args.with_path):
                continue  # one file: stdout stays empty, as it always was
        except Exception as exc:  # a bug: this file gets one line, the others are still answered
            status = 1
            line = dumps(operation_outcome(f"{path}: internal error", "exception"))
            print(
                f"cds-service evaluate: {path}: internal error ({type(exc).__name__})",
                file=sys.stderr,
                flush=True,
            )
            if not (several or args.with_path):
                continue
        if args.with_path:
            line = f'{{"path":{dumps(path)},"answer":{line}}}'
        print(line, flush=several)
    return status


def as_the_service(settings: Settings) -> str | None:
    """Answer as the service would: sign card uuids as it does, and return where its cards link the
    evidence pages. CDS_AUDIT_KEY and CDS_PUBLIC_BASE_URL first; else what the last `serve` or `demo`
    on this database (CDS_DATABASE_URL) recorded; else unsigned uuids and the default `serve` address
    (None)."""
    from cds_service import card_ids

    recorded = None
    if settings.audit_key is None or not settings.public_base_url:
        from cds_service.store.database import recorded_served_base

        recorded = recorded_served_base(settings)
    if settings.audit_key is not None:
        card_ids.configure(settings.audit_key.get_secret_value().encode())
    else:
        card_ids.use_signing_key(recorded.card_key if recorded else None)
    return settings.public_base_url or (recorded.base_url if recorded else None)


def _evaluate_fhir_server(
    args: argparse.Namespace, service: Service, settings: Settings, today: dt.date
) -> int:
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
        outcome = answer(body, service, settings, today, base_url=as_the_service(settings))
    except PatientNotFound as exc:  # one line says it all
        raise CliError(exc.diagnostics) from None
    except FetchFailed as exc:  # what was read and what failed, then the reason
        _print_fetch_report(args.fhir_server, exc.report)
        raise CliError(exc.diagnostics) from None
    except ServiceError as exc:
        raise CliError(exc.diagnostics) from None
    print(outcome.minted.json.decode())  # the bytes `serve` sends
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
    from cds_service.store.database import StoreError, normalise_url, open_store

    url = normalise_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise CliError(f"no database at {url.database} (CDS_DATABASE_URL)")
    try:
        return open_store(settings)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def report(args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.store.report import as_csv, as_table, build_report, parse_since

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    built = _with_our_reason_displays(build_report(_open_existing_store(settings), since))
    sys.stdout.write(as_csv(built) if args.format == "csv" else as_table(built))
    return 0


def _with_our_reason_displays(built: Report) -> Report:
    """Name our own override reasons that feedback carried without a display."""
    from dataclasses import replace

    from cds_service.render.cards import override_reason_displays

    known = override_reason_displays()
    reasons = [
        replace(r, display=known[(r.system, r.code)])
        if r.display == "-" and (r.system, r.code) in known
        else r
        for r in built.override_reasons
    ]
    return replace(built, override_reasons=reasons)


def migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.store.database import StoreError, open_store

    try:
        counts = open_store(settings).counts()
    except StoreError as exc:
        raise CliError(str(exc)) from None
    print("database schema at head: " + ", ".join(f"{table} {n} rows" for table, n in counts.items()))
    return 0

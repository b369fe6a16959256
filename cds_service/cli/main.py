"""`cds-service`: run the CRC metastases CDS Hooks service, or use it from the command line.

Configuration comes from CDS_* environment variables (see the README); a bad value stops every
command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from cds_service.cli import commands, fixtures, server
from cds_service.cli.common import CliError, load_settings
from cds_service.settings import Settings
from cds_service.telemetry.logs import configure_logging

Command = Callable[[argparse.Namespace, Settings], int]

EVALUATE_OUTPUT = """output:
  stdout holds one JSON document per line, one line per PATH, in the order given: the answer
  {"cards": [...]} exactly as the service sends it over HTTP. With several PATHs, a file that
  cannot be answered keeps its line: an OperationOutcome whose diagnostics start with its PATH
  (as the service answers a bad request), so line N is always the answer for the Nth PATH; the
  reason also goes to stderr, one line per file, and the other files are still answered. With
  one PATH a bad file prints nothing on stdout. --with-path labels every line with its PATH.
  A reader that stops early (| head) ends the command quietly."""

_EXIT_CODES = (
    """exit status: 0 done; 2 bad input or configuration (one line on stderr); 1 a bug (one line)."""
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text) if text != "0" else 0
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _add_bind(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for all)"
    )
    parser.add_argument(
        "--port", type=_port, default=8080, help="TCP port to listen on (default: %(default)s)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cds-service",
        description=__doc__,
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the CDS service with gunicorn (configuration from CDS_* variables)",
        description="Serve the CDS service with gunicorn (gthread workers). The store is migrated at start; "
        "extra gunicorn settings via GUNICORN_CMD_ARGS.",
        epilog=_EXIT_CODES,
    )
    _add_bind(serve)
    serve.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="gunicorn worker processes (default: CDS_WORKERS, else 2; about one per core)",
    )
    serve.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="threads per worker, for requests waiting on FHIR servers (default: CDS_THREADS, else 8)",
    )
    serve.set_defaults(func=server.serve)

    demo = sub.add_parser(
        "demo",
        help="serve on the embedded demo patients, client-JWT checks off",
        description="Serve the service, the card preview page at / and the demo patients as a read-only "
        "FHIR server at /fhir, with client-JWT checking OFF (one worker, 8 threads). Never expose it to "
        "real patient data.",
        epilog=_EXIT_CODES,
    )
    _add_bind(demo)
    demo.set_defaults(func=server.demo)

    evaluate = sub.add_parser(
        "evaluate",
        help="print the cards for FHIR Bundle or hook-request files, or for a patient on a FHIR server",
        description="Print the service's answer for each PATH: a FHIR Bundle holding one patient's chart "
        "(collection, transaction or document), or a complete CDS Hooks request; JSON or gzip-compressed "
        "JSON (.json.gz). With --fhir-server, read one patient from a live FHIR R4 server instead and "
        "report on stderr what was fetched.",
        epilog=EVALUATE_OUTPUT + "\n\n" + _EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "paths", nargs="*", metavar="PATH", help="FHIR Bundle or CDS Hooks request files (.json, .json.gz)"
    )
    evaluate.add_argument(
        "--with-path",
        action="store_true",
        help='print each answer as {"path": PATH, "answer": ...} (default: off, the bare answer)',
    )
    evaluate.add_argument(
        "--fhir-server",
        metavar="URL",
        help="read the chart from this FHIR R4 base URL instead of files (https, or http on loopback; "
        "default: none)",
    )
    evaluate.add_argument(
        "--patient", metavar="ID", help="the patient id on --fhir-server (required with it; no default)"
    )
    evaluate.add_argument("--token", metavar="T", help="bearer token for --fhir-server (default: none)")
    evaluate.set_defaults(func=commands.evaluate)

    report = sub.add_parser(
        "report",
        help="calls, cards, acceptance and override rates, latency from the store",
        description="Summarise the audit and feedback store (CDS_DATABASE_URL).",
        epilog=_EXIT_CODES,
    )
    report.add_argument(
        "--since", metavar="DATE", help="only hook calls answered since DATE (YYYY-MM-DD, UTC; default: all)"
    )
    report.add_argument(
        "--format", choices=("table", "csv"), default="table", help="output format (default: %(default)s)"
    )
    report.set_defaults(func=commands.report)

    fixture_cmd = sub.add_parser(
        "fixtures",
        help="export the demo patients as FHIR transaction Bundles, or load them into a FHIR server",
        description="The demo patients of fixtures/fhir/, for a FHIR sandbox server. Their dates are "
        f"moved so that each patient's latest event is {fixtures.RECENT_DAYS} days ago (intervals kept).",
        epilog=_EXIT_CODES,
    )
    fixture_sub = fixture_cmd.add_subparsers(dest="fixtures_command", required=True, metavar="ACTION")
    export = fixture_sub.add_parser(
        "export",
        help="write one FHIR R4 transaction Bundle per demo patient into DIR",
        description="Write one FHIR R4 transaction Bundle per demo patient into DIR (same file names as "
        "fixtures/fhir/): resources POSTed under urn:uuid fullUrls, so the server assigns the ids.",
        epilog=_EXIT_CODES,
    )
    export.add_argument("dir", metavar="DIR", help="folder to write into (created if missing; no default)")
    export.set_defaults(func=fixtures.export)
    load = fixture_sub.add_parser(
        "load",
        help="post every demo patient to a FHIR server, one transaction each",
        description="POST every demo patient to FHIR_BASE_URL, one transaction per patient, and print a "
        "tab-separated line for each: file, the patient's id on the server, its story (what the card "
        "should say). 429/503 are retried as the server asks; the first refusal stops with its reason. "
        "The same rules as a hook call's fhirServer apply: https, or http on loopback (or "
        "CDS_ALLOW_INSECURE_FHIR=true), within CDS_FHIR_SERVER_ALLOWLIST when set.",
        epilog=_EXIT_CODES,
    )
    load.add_argument(
        "fhir_base_url", metavar="FHIR_BASE_URL", help="the server's FHIR R4 base URL (no default)"
    )
    load.add_argument("--token", metavar="T", help="bearer token for the server (default: none)")
    load.set_defaults(func=fixtures.load)

    migrate = sub.add_parser(
        "migrate",
        help="bring the store's schema to head (serve also does it at start)",
        description="Create or upgrade the store at CDS_DATABASE_URL to the latest schema, then exit.",
        epilog=_EXIT_CODES,
    )
    migrate.set_defaults(func=commands.migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func: Command = args.func
    try:
        settings = load_settings()
    except CliError as exc:  # before logging is set up: the log settings may be the bad ones
        print(f"cds-service {args.command}: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.level_for(args.command), json_lines=settings.json_logs_for(args.command))
    if args.command in ("evaluate", "report"):
        logging.disable(logging.WARNING)  # their stderr is for a one-line error only
    try:
        return int(func(args, settings) or 0)
    except BrokenPipeError:
        return _reader_gone()
    except CliError as exc:
        print(f"cds-service {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line for the user, not a traceback
        print(f"cds-service {args.command}: internal error ({type(exc).__name__})", file=sys.stderr)
        return 1


def _reader_gone() -> int:
    """stdout's reader left (`| head`): not an error. Later writes, and the flush at exit, go nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Structured logs and the Prometheus set-up that must happen before prometheus_client is imported.

Logs are one JSON object per line (`CDS_LOG_FORMAT=json`, the default of `serve` and `demo`) with
the request id of the request being answered. What is logged is chosen by the code that logs:
never a patient id, a FHIR resource, a token or a request body (see app.py, feedback.py).
"""

from __future__ import annotations

import atexit
import contextvars
import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("cds_request_id", default=None)

# The attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# Characters that end or hide a line for some reader of a log (a terminal, `str.splitlines`, a log
# shipper): C0 and C1 controls, DEL, the Unicode line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}" if ord(match.group()) < 0x100 else f"\\u{ord(match.group()):04x}"


def _json_escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"  # a JSON string escape: the line stays valid JSON


def escape_for_log(text: str) -> str:
    """`text` on one line, control characters escaped: a client's newline cannot forge a log line."""
    return _UNSAFE.sub(_escaped, text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            doc["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        try:
            line = orjson.dumps(doc, default=str).decode()  # a few times faster than json.dumps
        except TypeError:  # what orjson cannot write (an integer beyond 64 bits, a lone surrogate)
            line = json.dumps(doc, ensure_ascii=False, default=str)
        # Both escape C0 controls but leave DEL, C1 and U+2028/9 as they are.
        return _UNSAFE.sub(_json_escaped, line)


class TextFormatter(logging.Formatter):
    """The human format, with the request id when there is one: one line per record.

    The message is escaped (it may quote what a client sent); a traceback follows on lines of its
    own, each indented, so no line of it can pass for a record.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_for_log(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        request_id = REQUEST_ID.get()
        if request_id:
            text = f"{text} [request {request_id}]"
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            text += "".join(f"\n    | {escape_for_log(line)}" for line in trace.splitlines())
        return text


def _lean_records() -> None:
    """Log records without what no line of ours shows: the caller's file, line and function (a
    stack walk per record), thread and process names. What the logging documentation's
    "Optimization" section advises; a hook call's log line costs about a tenth less."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def configure_logging(level: str, *, json_lines: bool) -> None:
    """Root logging for a command: JSON lines or text on stderr."""
    _lean_records()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic announces each of its plugins at INFO on every start; only its warnings matter here.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def gunicorn_logconfig(level: str, *, json_lines: bool) -> dict[str, Any]:
    """gunicorn's logging (replacing its defaults): its own lines in our format, no access log.

    Our app writes the access line (ops.py); gunicorn's would carry the raw request line, whose
    path and query string can hold a patient id (the demo's /fhir searches).
    """
    _lean_records()
    formatter = JsonFormatter if json_lines else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"cds": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "cds", "stream": "ext://sys.stderr"}
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
    }


# --- request ids -------------------------------------------------------------------------------------

# An id we accept from a proxy or client (X-Request-Id): short and harmless in a log line.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def accepted_request_id(header: str | None) -> str | None:
    return header if header and _SAFE_ID.fullmatch(header) else None


# --- Prometheus across gunicorn workers ----------------------------------------------------------------

# prometheus_client's files: <type>_<pid>.db (e.g. counter_1234.db, gauge_livesum_1234.db).
_METRIC_FILE = re.compile(r"(counter|histogram|summary|gauge_\w+)_\d+\.db")


def prepare_metrics_dir() -> Path:
    """Make prometheus_client share metrics between gunicorn workers (its multiprocess mode).

    Must run before prometheus_client is first imported: it reads PROMETHEUS_MULTIPROC_DIR then.
    An operator's directory is emptied of old metric files (stale files would double-count);
    otherwise a fresh temporary directory is used.
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        folder = Path(configured)
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if _METRIC_FILE.fullmatch(path.name):
                path.unlink(missing_ok=True)
        return folder
    folder = Path(tempfile.mkdtemp(prefix="cds-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


def remove_metrics_dir_at_exit(folder: Path) -> None:
    """Remove our temporary metrics folder when this process (gunicorn's master) exits.

    Forked workers inherit atexit handlers and run them when they exit (e.g. --max-requests
    recycling): only the process that made the folder may remove it.
    """
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner and folder.name.startswith("cds-metrics-"):  # only the temporary one we made
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)

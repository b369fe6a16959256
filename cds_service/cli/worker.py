"""The gunicorn worker of `serve` and `demo`, and why gunicorn is configured as it is (server.py).

- No control socket. gunicorn 25.1+ opens one by default under $XDG_RUNTIME_DIR or $HOME (in the
  container, the data volume): instances sharing a HOME replaced each other's, and nothing here
  uses `gunicornc`. An operator who wants it names a path of its own in GUNICORN_CMD_ARGS
  (`--control-socket /run/cds-service/gunicorn.ctl`), which turns it back on.
- No gunicorn access log (`AppLogs`): the app writes each request's access line (web/ops.py);
  gunicorn's request line could carry a patient id. Only switched off by its settings, gunicorn
  would still build every line's fields (~25 µs a call) because a logging config is given.
- Requests gunicorn refuses before the app sees them — headers over its limits (431), a request
  line over its limit (414), malformed HTTP (400) — are answered with an OperationOutcome, like every
  other non-2xx answer, instead of gunicorn's HTML page. gunicorn's limits stay as they are: they
  bound the memory a request's head can take.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger
from gunicorn.http import errors as http_errors
from gunicorn.util import write_nonblock
from gunicorn.workers.gthread import ThreadWorker

from cds_service.errors import operation_outcome
from cds_service.jsonio import dump_bytes

# gunicorn's parse errors → (status, reason phrase, FHIR issue type, diagnostics). First match wins;
# the diagnostics never quote the request (its line or headers may hold a patient id or a token).
# By name: older gunicorn releases lack some of these classes.
_REFUSAL_NAMES = (
    (
        "LimitRequestHeaders",
        431,
        "Request Header Fields Too Large",
        "too-long",
        "request headers too large (at most {fields} headers of {field_size} bytes each)",
    ),
    ("LimitRequestLine", 414, "URI Too Long", "too-long", "request line longer than {line} bytes"),
    ("UnsupportedTransferCoding", 501, "Not Implemented", "not-supported", "transfer coding not supported"),
    ("ExpectationFailed", 417, "Expectation Failed", "not-supported", "expectation not supported"),
    ("ForbiddenProxyRequest", 403, "Forbidden", "forbidden", "request forbidden"),
    ("ParseException", 400, "Bad Request", "invalid", "malformed HTTP request"),
)
_REFUSALS: tuple[tuple[type[Exception], int, str, str, str], ...] = tuple(
    (getattr(http_errors, name), *rest) for name, *rest in _REFUSAL_NAMES if hasattr(http_errors, name)
)
# These are the application's fault, or gunicorn's configuration's: a 500 from gunicorn as before.
_NOT_THE_CLIENTS = tuple(
    getattr(http_errors, name)
    for name in ("InvalidResponseHeader", "InvalidResponseHeaderName", "ConfigurationProblem")
    if hasattr(http_errors, name)
)


class Worker(ThreadWorker):
    """gunicorn's gthread worker, answering the requests it refuses itself with an OperationOutcome."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, _NOT_THE_CLIENTS) or not isinstance(exc, http_errors.ParseException):
            super().handle_error(req, client, addr, exc)
            return
        status, reason, issue_code, text = next(
            (s, r, c, t) for cls, s, r, c, t in _REFUSALS if isinstance(exc, cls)
        )
        diagnostics = text.format(
            fields=self.cfg.limit_request_fields,
            field_size=self.cfg.limit_request_field_size,
            line=self.cfg.limit_request_line,
        )
        # The exception's text quotes the request: its class is enough to tell what happened.
        self.log.info("request refused before the app: %d (%s)", status, type(exc).__name__)
        body = dump_bytes(operation_outcome(diagnostics, issue_code))
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Connection: close\r\n"
            "Content-Type: application/fhir+json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            "Cache-Control: no-store\r\n"
            "\r\n"
        )
        try:
            write_nonblock(client, head.encode("ascii") + body)
        except Exception:  # the client has gone; nothing to answer
            self.log.debug("could not send the refusal")


class AppLogs(Logger):
    """gunicorn's logger without its access log (the app writes the access lines)."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None

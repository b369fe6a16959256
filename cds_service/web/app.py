"""create_app(settings): the Flask app factory, routes and error handlers.

The only module that knows Flask. Every non-2xx answer is a FHIR OperationOutcome; no answer
ever carries a stack trace, and nothing logged carries PHI or tokens.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from cds_service.errors import BadRequest, NotFound, PayloadTooLarge, ServiceError, operation_outcome
from cds_service.feedback import receive_feedback
from cds_service.hooks.catalogue import Service, services
from cds_service.hooks.models import Discovery, prune
from cds_service.jsonio import dump_bytes, loads
from cds_service.pipeline import Answers, answer, kept_answer, warm_up
from cds_service.settings import Settings
from cds_service.store.audit import AuditTrail
from cds_service.store.database import open_store
from cds_service.web import auth, evidence, ops
from cds_service.web.capacity import FhirGate, fhir_bound

log = logging.getLogger("cds_service.app")  # the name operators filter on, kept across the move

_HTTP_ISSUE_CODES = {
    400: "invalid",
    401: "security",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    413: "too-long",
    415: "not-supported",
}
_CORS_PREFIXES = ("/cds-services", "/fhir")

bp = Blueprint("cds", __name__)


def _json(document: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(dump_bytes(document), status=status, content_type=f"{content_type}; charset=utf-8")


def _error(status: int, diagnostics: str, issue_code: str) -> Response:
    response = _json(operation_outcome(diagnostics, issue_code), status, "application/fhir+json")
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750: the scheme the client must use
    return response


def _settings() -> Settings:
    return current_app.extensions["cds.settings"]


def _audit() -> AuditTrail:
    return current_app.extensions["cds.audit"]


def _service(service_id: str) -> Service:
    service = services().get(service_id)
    if service is None:
        raise NotFound(f"no CDS service {service_id!r} here; see GET /cds-services")
    return service


def _body() -> Any:
    return _parsed(_raw_body())


def _raw_body() -> bytes:
    try:
        # One sized read when the length is known: get_data() reads in 64 KB chunks and joins them,
        # twice the copying (~15 µs for a 200 KB chart).
        length = request.content_length
        raw = request.stream.read(length) if length is not None else request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"request body over {_settings().max_body_bytes} bytes") from None
    if not raw.strip():
        raise BadRequest("the request body is empty")
    return raw


def _parsed(raw: bytes) -> Any:
    try:
        return loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"the request body is not valid JSON ({getattr(exc, 'msg', 'undecodable')})"
        ) from None


# request.host_url by the environ values it is built from: building it (URL joining and decoding)
# costs about as much as the rest of a kept answer's route. Bounded: the Host header is the caller's.
_HOST_URLS: dict[tuple[Any, ...], str] = {}
_HOST_URL_KEYS = ("wsgi.url_scheme", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "SCRIPT_NAME")


def _host_url() -> str:
    environ = request.environ
    key = tuple(environ.get(k) for k in _HOST_URL_KEYS)
    url = _HOST_URLS.get(key)
    if url is None:
        url = request.host_url
        if len(_HOST_URLS) >= 64:
            _HOST_URLS.clear()
        _HOST_URLS[key] = url
    return url


@bp.get("/cds-services", strict_slashes=False)  # `/cds-services/` too: clients append the slash
def discovery() -> Response:
    doc = Discovery(services=[s.discovery() for s in services().values()])
    return _json(prune(doc.model_dump(mode="json")))


@bp.get("/healthz")
def healthz() -> Response:
    return _json({"status": "ok"})


@bp.post("/cds-services/<service_id>")
def hook(service_id: str) -> Response:
    service = _service(service_id)
    settings = _settings()
    issuer = auth.authenticate(request, settings)
    raw = _raw_body()
    today = current_app.extensions["cds.today"]()
    base_url = None if settings.public_base_url else _host_url()
    answers = current_app.extensions["cds.answers"]
    # A chart sent again is answered from its bytes: not parsed (most of what such a call costs).
    looked_up = kept_answer(raw, service, today, answers, issuer=issuer, base_url=base_url)
    outcome = looked_up[0]
    held: list[Any] = [raw]
    if outcome is None:
        body = _parsed(raw)
        held.append(body)
        gate: FhirGate = current_app.extensions["cds.fhir_gate"]
        with gate.admit(
            fhir_bound(body, service)
        ):  # 503 when this worker's FHIR-bound calls are at their limit
            outcome = answer(
                body,
                service,
                settings,
                today,
                issuer=issuer,
                base_url=base_url,
                answers=answers,
                raw=raw,
                looked_up=looked_up,
            )
        del body
    # Said on the call's one access line (ops.py), not on a line of its own: a log line costs about as
    # much as the rest of a kept answer's work.
    request.environ[ops.ANSWERED] = {
        "card_count": len(outcome.recommendations),  # one recommendation per card
        "recommendations": ",".join(outcome.recommendations) or "-",
        "chart_resources": outcome.chart_size,
        "fhir_mode": outcome.source.fhir_mode,
        "evaluate_ms": round(outcome.seconds * 1000, 1),
    }
    _audit().record(service.id, outcome, ops.elapsed())  # spooled before the answer (else 503)
    response = Response(outcome.minted.json, content_type="application/json; charset=utf-8")
    # Freeing a parsed chart costs ~0.3 µs a resource (0.15 ms at 500, 2 ms at 5,000). The server
    # closes the response once its last byte is sent, so the EHR no longer waits for that.
    del raw
    response.call_on_close(held.clear)
    return response


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    service = _service(service_id)
    auth.authenticate(request, _settings())
    receive_feedback(_body(), service.id, _audit())
    # CDS Hooks 2.0 defines no feedback response body; an empty JSON object parses everywhere.
    return _json({})


# Set on every answer of the service endpoints (CORS) and of the whole app (security). Added in one
# pass: werkzeug's `headers[...] = ` rescans the whole header list on each assignment.
_CORS_HEADERS = (
    ("Vary", "Origin"),  # the answer depends on Origin: caches must not mix them
    ("Access-Control-Allow-Headers", "Authorization, Content-Type, X-Request-Id"),
    ("Access-Control-Expose-Headers", "X-Request-Id"),  # so a browser client can quote it to us
    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
    ("Access-Control-Max-Age", "600"),
)
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
# JSON is data: should a browser ever render it, nothing may load or run, nor be framed.
_DATA_HEADERS = (
    *_SECURITY_HEADERS,
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
)


def _headers(response: Response) -> Response:
    """CORS (the service endpoints) and security headers (every answer), added in one pass."""
    added: list[tuple[str, str]] = []
    # Browser-based CDS clients (the sandbox) call the service endpoints only; /healthz, /metrics
    # and the preview page get no CORS headers. Preflight is Flask's automatic OPTIONS answer.
    path = request.path
    if any(path == p or path.startswith(p + "/") for p in _CORS_PREFIXES):
        allowed = _settings().cors_origins
        origin = request.headers.get("Origin")
        allow = "*" if "*" in allowed else origin if origin in allowed else None
        if allow is not None:
            # Set, not added: a blueprint may have set it already (the demo FHIR server), and a
            # browser refuses an answer that carries two.
            response.headers["Access-Control-Allow-Origin"] = allow
        added += _CORS_HEADERS
    # Only where not set already: a blueprint serving HTML (the preview page) sets its own,
    # stricter-for-it policy.
    present = {name.lower() for name, _ in response.headers}
    wanted = _SECURITY_HEADERS if response.mimetype == "text/html" else _DATA_HEADERS
    added += [(name, value) for name, value in wanted if name.lower() not in present]
    response.headers.extend(added)
    return response


def _handle_service_error(exc: ServiceError) -> Response:
    retry_after = getattr(exc, "retry_after", None)  # a 503 for lack of capacity: not a bug
    if exc.status >= 500 and retry_after is None:
        log.error("request failed: %s", exc.diagnostics)
    else:
        log.info("request refused (%d %s): %s", exc.status, exc.issue_code, exc.diagnostics)
    response = _error(exc.status, exc.diagnostics, exc.issue_code)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _handle_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        return _error(413, f"request body over {_settings().max_body_bytes} bytes", "too-long")
    return _error(status, exc.description or exc.name, _HTTP_ISSUE_CODES.get(status, "exception"))


def _handle_unexpected(exc: Exception) -> Response:
    # A bug: the trace goes to the log (no request data), the client gets a plain OperationOutcome.
    log.exception("unexpected error while answering %s %s", request.method, request.path)
    return _error(500, "internal error", "exception")


class _SingleSlashes:
    """WSGI middleware: repeated slashes in the path count as one."""

    def __init__(self, wsgi_app: Any) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if "//" in path:
            environ["PATH_INFO"] = _SLASHES.sub("/", path)
        return self.wsgi_app(environ, start_response)


_SLASHES = re.compile("/{2,}")


class _Flask(Flask):
    """Flask, remembering which views and hooks are coroutine functions: it asks `inspect` again for
    each one on every request (five times a hook call, about as long as writing the answer), and
    ours never change once the app is made."""

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        known = self.__dict__.setdefault("_sync_functions", {})
        sync = known.get(func)
        if sync is None:
            sync = known[func] = super().ensure_sync(func)
        return sync


def create_app(
    settings: Settings | None = None,
    *,
    today: Callable[[], dt.date] | None = None,
    demo_resources: list[dict[str, Any]] | None = None,
) -> Flask:
    settings = settings or Settings()
    warm_up()
    app = _Flask(__name__)
    # `//cds-services/x` (a base URL ending in `/`) is routed as `/cds-services/x`, never answered
    # with werkzeug's HTML redirect (which no EHR follows on a POST anyway).
    app.url_map.merge_slashes = False
    app.wsgi_app = _SingleSlashes(app.wsgi_app)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["cds.settings"] = settings
    app.extensions["cds.today"] = today or (lambda: dt.datetime.now(dt.UTC).date())
    # Opens the audit/feedback store and migrates its schema to head (under a lock: store.migrate).
    app.extensions["cds.store"] = store = open_store(settings)
    app.extensions["cds.audit"] = AuditTrail(store)
    app.extensions["cds.fhir_gate"] = FhirGate(settings.max_fhir_calls)
    app.extensions["cds.answers"] = Answers()  # a chart sent again is answered from its kept cards
    auth.init_app(app, settings)  # the trusted issuers' key caches; warns when auth is off
    if not settings.cors_origins:
        log.warning(
            "CDS_CORS_ORIGINS is empty: browsers refuse every call of a browser-based CDS client "
            "(the CDS Hooks sandbox); EHRs calling from their servers are not affected"
        )
    ops.init_app(app)
    app.register_blueprint(bp)
    app.register_blueprint(evidence.bp)
    if demo_resources is not None:
        from cds_service.web.demo_fhir import create_fhir_blueprint

        app.register_blueprint(create_fhir_blueprint(demo_resources))
    if settings.preview:
        from cds_service.web.preview import create_preview_blueprint

        app.register_blueprint(create_preview_blueprint(demo_resources))
    app.after_request(_headers)
    app.register_error_handler(ServiceError, _handle_service_error)
    app.register_error_handler(HTTPException, _handle_http_error)
    app.register_error_handler(Exception, _handle_unexpected)
    return app

"""create_app(settings): the Flask app factory, routes and error handlers.

The only module that knows Flask. Every non-2xx answer is a FHIR OperationOutcome; no answer
ever carries a stack trace, and nothing logged carries PHI or tokens.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import auth
from .catalog import Service, services
from .engine import answer
from .errors import BadRequest, NotFound, PayloadTooLarge, ServiceError, operation_outcome
from .protocol import Discovery, dumps, prune
from .settings import Settings

log = logging.getLogger(__name__)

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
    return Response(dumps(document), status=status, content_type=f"{content_type}; charset=utf-8")


def _error(status: int, diagnostics: str, issue_code: str) -> Response:
    return _json(operation_outcome(diagnostics, issue_code), status, "application/fhir+json")


def _settings() -> Settings:
    return current_app.extensions["cds.settings"]


def _service(service_id: str) -> Service:
    service = services().get(service_id)
    if service is None:
        raise NotFound(f"no CDS service {service_id!r} here; see GET /cds-services")
    return service


def _body() -> Any:
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"request body over {_settings().max_body_bytes} bytes") from None
    if not raw.strip():
        raise BadRequest("the request body is empty")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(
            f"the request body is not valid JSON ({getattr(exc, 'msg', 'undecodable')})"
        ) from None


@bp.get("/cds-services")
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
    auth.authenticate(request, settings)
    outcome = answer(_body(), service, settings, current_app.extensions["cds.today"]())
    log.info(
        "hook %s answered: %d card(s) %s, chart %d resources, %s, %.1f ms",
        service.id,
        len(outcome.answer["cards"]),
        ",".join(outcome.recommendations) or "-",
        outcome.chart_size,
        outcome.source.fhir_mode,
        outcome.seconds * 1000,
    )
    return _json(outcome.answer)


def _cors(response: Response) -> Response:
    if request.path.startswith(_CORS_PREFIXES):
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Max-Age"] = "600"
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _handle_service_error(exc: ServiceError) -> Response:
    if exc.status >= 500:
        log.error("request failed: %s", exc.diagnostics)
    else:
        log.info("request refused (%d %s): %s", exc.status, exc.issue_code, exc.diagnostics)
    return _error(exc.status, exc.diagnostics, exc.issue_code)


def _handle_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        return _error(413, f"request body over {_settings().max_body_bytes} bytes", "too-long")
    return _error(status, exc.description or exc.name, _HTTP_ISSUE_CODES.get(status, "exception"))


def _handle_unexpected(exc: Exception) -> Response:
    # A bug: the trace goes to the log (no request data), the client gets a plain OperationOutcome.
    log.exception("unexpected error while answering %s %s", request.method, request.path)
    return _error(500, "internal error", "exception")


def create_app(
    settings: Settings | None = None,
    *,
    today: Callable[[], dt.date] | None = None,
    demo_resources: list[dict[str, Any]] | None = None,
) -> Flask:
    settings = settings or Settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["cds.settings"] = settings
    app.extensions["cds.today"] = today or (lambda: dt.datetime.now(dt.UTC).date())
    app.register_blueprint(bp)
    if demo_resources is not None:
        from .demo_fhir import create_fhir_blueprint

        app.register_blueprint(create_fhir_blueprint(demo_resources))
    app.after_request(_cors)
    app.register_error_handler(ServiceError, _handle_service_error)
    app.register_error_handler(HTTPException, _handle_http_error)
    app.register_error_handler(Exception, _handle_unexpected)
    return app

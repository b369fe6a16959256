"""The operations side of the Flask app: request ids, the access log, request metrics, /metrics.

`init_app` is called by app.create_app. The access log names the route template
(`/cds-services/<service_id>`), never the path or query string: the demo's `/fhir` URLs hold patient ids.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Request, Response, request

from cds_service.hooks.catalogue import services
from cds_service.ids import UniqueIds
from cds_service.telemetry import metrics
from cds_service.telemetry.logs import REQUEST_ID, accepted_request_id

log = logging.getLogger("cds_service.access")

_STARTED = "cds.started"
_REQUEST_ID = "cds.request_id"
_CONTEXT_TOKEN = "cds.request_id_token"
# Probes and scrapers call these every few seconds; their access lines are debug noise.
_QUIET_ENDPOINTS = frozenset({"healthz", "metrics"})
# What a hook call answered (set by its route): fields of the call's access line.
ANSWERED = "cds.answered"


def init_app(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_finish)
    app.teardown_request(_forget)
    app.add_url_rule("/metrics", "metrics", _metrics, methods=["GET"])


def elapsed() -> float:
    """Seconds since this request started (0 outside a request the app started timing)."""
    started = request.environ.get(_STARTED)
    return time.perf_counter() - started if started is not None else 0.0


def _start() -> None:
    environ = request.environ  # one context lookup, not four
    environ[_STARTED] = time.perf_counter()
    request_id = accepted_request_id(environ.get("HTTP_X_REQUEST_ID")) or _REQUEST_IDS.next_id()
    environ[_REQUEST_ID] = request_id
    environ[_CONTEXT_TOKEN] = REQUEST_ID.set(request_id)


_REQUEST_IDS = UniqueIds()  # ours, when the caller sent none we accept


def _finish(response: Response) -> Response:
    req = request._get_current_object()  # type: ignore[attr-defined]  # one context lookup, not eight
    request_id = req.environ.get(_REQUEST_ID)
    if request_id:
        response.headers["X-Request-Id"] = request_id
    seconds = elapsed()
    service, endpoint = _labels(req)
    metrics.observe_request(service, endpoint, response.status_code, seconds)
    route = req.url_rule.rule if req.url_rule is not None else "-"
    fields = {
        "method": req.method,
        "route": route,
        "status": response.status_code,
        "duration_ms": round(seconds * 1000, 1),
        "service": service,
    }
    answered = req.environ.get(ANSWERED)
    if answered is None:
        log.log(
            logging.DEBUG if endpoint in _QUIET_ENDPOINTS else logging.INFO,
            "%s %s %d %.1f ms",
            req.method,
            route,
            response.status_code,
            seconds * 1000,
            extra=fields,
        )
    else:
        log.info(
            "%s %s %d %.1f ms: %d card(s) %s, chart %d resources, %s, evaluated in %.1f ms",
            req.method,
            route,
            response.status_code,
            seconds * 1000,
            answered["card_count"],
            answered["recommendations"],
            answered["chart_resources"],
            answered["fhir_mode"],
            answered["evaluate_ms"],
            extra={**fields, **answered},
        )
    return response


def _forget(_exc: BaseException | None) -> None:
    # gthread workers reuse threads: the next request on this thread must not inherit the id.
    token = request.environ.pop(_CONTEXT_TOKEN, None)
    if token is not None:
        REQUEST_ID.reset(token)


def _labels(req: Request) -> tuple[str, str]:
    service_id = (req.view_args or {}).get("service_id")
    service = service_id if service_id in services() else "-"
    endpoint = req.endpoint.rsplit(".", 1)[-1] if req.endpoint else "unmatched"
    return service, endpoint


def _metrics() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)

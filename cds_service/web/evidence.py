"""`GET /evidence` and `GET /evidence/<model>`: the evidence pages, rendered by render/evidence_pages."""

from __future__ import annotations

from flask import Blueprint, Response

from cds_service.render.evidence_pages import CSP, Page, index_page, model_page

bp = Blueprint("evidence", __name__)


def _html(page: Page) -> Response:
    response = Response(page.html, status=page.status, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    return response


@bp.get("/evidence")
def index() -> Response:
    return _html(index_page())


@bp.get("/evidence/<model>")
def model(model: str) -> Response:
    return _html(model_page(model))

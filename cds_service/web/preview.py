"""The preview page at `/`: the cards as an EHR shows them, for demo or sandbox patients.

Server-rendered HTML (Jinja, autoescaped) with one small script that posts feedback; no build step,
nothing from a CDN. The hook call goes through the app's own hook route (a test client inside this
request), so the page shows exactly what an EHR gets: the same validation, authentication, FHIR safety
rules and audit record — which is also what lets feedback posted from the page name real cards.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import yaml
from flask import Blueprint, Response, abort, current_app, render_template, request, url_for

from cds_service.clinical.fhir_fields import is_fhir_id
from cds_service.hooks.catalogue import Service, services
from cds_service.paths import data_dir
from cds_service.render.views import CardView, cards_of
from cds_service.urls import listen_url

_MAX_URL = 2048
_MAX_TOKEN = 8192
# The demo's FHIR endpoint (demo_fhir.create_fhir_blueprint's default prefix) and the blueprint name.
_DEMO_FHIR_BLUEPRINT, _DEMO_FHIR_PREFIX = "demo_fhir", "/fhir"
# 'self' only: the page's one script and stylesheet. No inline script or style, so even markup that
# slipped through escaping could not run; feedback goes to our own endpoint (connect-src).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


# --- demo patients -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoPatient:
    id: str
    title: str  # what a clinician would call the chart, e.g. "01. Lung + adrenal metastases, …"
    story: str  # in plain words: what the chart holds and what the card should say


@cache
def _fixture_stories() -> dict[str, tuple[str, str]]:
    """Patient id → (title, story), from the fixture files and fixtures/fhir/patients.yaml."""
    folder = data_dir("fixtures")
    plain_file = folder / "patients.yaml"
    plain = yaml.safe_load(plain_file.read_text(encoding="utf-8")) if plain_file.is_file() else {}
    stories: dict[str, tuple[str, str]] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name == "expected.json":
            continue
        entry = plain.get(path.name) or {}
        number = path.stem.split("-", 1)[0]
        title = f"{number}. {entry['title']}" if entry.get("title") else path.stem.replace("-", " ")
        bundle = json.loads(path.read_text(encoding="utf-8"))
        for patient in _patients(bundle.get("entry", [])):
            stories[patient["id"]] = (title, str(entry.get("story", "")))
    return stories


def _patients(items: Iterable[Any]) -> list[dict[str, Any]]:
    """The Patients among resources, Bundle entries or Bundles (as demo_fhir accepts them)."""
    found: list[dict[str, Any]] = []
    for item in items:
        resource = item.get("resource", item) if isinstance(item, dict) else None
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "Bundle":
            found.extend(_patients(resource.get("entry") or []))
        elif resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
            found.append(resource)
    return found


def demo_patients(resources: Sequence[dict[str, Any]]) -> list[DemoPatient]:
    stories = _fixture_stories()
    result = []
    for patient in _patients(resources):
        title, story = stories.get(patient["id"], (patient["id"], ""))
        result.append(DemoPatient(patient["id"], title, story))
    return result


# --- the hook call -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    status: int
    milliseconds: float
    request_json: str  # with any token hidden
    response_json: str
    cards: tuple[CardView, ...]
    error: str  # the OperationOutcome's diagnostics when the call failed


def own_fhir_base(environ: Mapping[str, Any]) -> str:
    """The demo's own /fhir, reached through the socket this server listens on (not the Host header:
    a client could name any host there, and a port mapped by Docker is not where we listen)."""
    host = str(environ.get("SERVER_NAME") or "127.0.0.1")
    return listen_url(host, environ.get("SERVER_PORT") or "80") + _DEMO_FHIR_PREFIX


def hook_request(service: Service, fhir_server: str, patient_id: str, token: str | None) -> dict[str, Any]:
    """A patient-view request without prefetch: the service reads everything from `fhir_server`."""
    body: dict[str, Any] = {
        "hook": service.hook,
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_server,
        "context": {"patientId": patient_id, "userId": "Practitioner/preview"},
    }
    if token:
        body["fhirAuthorization"] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds-service-preview",
        }
    return body


def _shown(body: dict[str, Any]) -> str:
    shown = json.loads(json.dumps(body))
    if "fhirAuthorization" in shown:  # the page never echoes a token back
        shown["fhirAuthorization"]["access_token"] = "(hidden)"
    return json.dumps(shown, indent=2, ensure_ascii=False)


def call_hook(service: Service, body: dict[str, Any]) -> Call:
    """POST `body` to this app's own hook route, in-process, and time it (FHIR reads included).

    Not `engine.answer` directly: the route also authenticates (a preview must not bypass
    CDS_AUTH_REQUIRED) and records the call, without which feedback on its cards would be refused.
    """
    started = time.perf_counter()
    response = current_app.test_client().post(
        url_for("cds.hook", service_id=service.id), json=body, base_url=request.host_url
    )
    milliseconds = (time.perf_counter() - started) * 1000
    answer = response.get_json(silent=True)
    cards: tuple[CardView, ...] = ()
    error = ""
    if response.status_code == 200:
        cards = cards_of(answer)
    else:
        issues = answer.get("issue") if isinstance(answer, dict) else None
        error = "; ".join(str(i.get("diagnostics") or "") for i in issues or () if isinstance(i, dict))
        error = error or f"HTTP {response.status_code}"
    return Call(
        status=response.status_code,
        milliseconds=milliseconds,
        request_json=_shown(body),
        response_json=json.dumps(answer, indent=2, ensure_ascii=False)
        if answer is not None
        else response.get_data(as_text=True),
        cards=cards,
        error=error,
    )


# --- the blueprint -------------------------------------------------------------------------------------


def _same_origin() -> bool:
    """A form POST from our own page (CSRF: another site must not make us call FHIR servers).

    Browsers send Sec-Fetch-Site; older ones only Origin ("null" from privacy-sensitive contexts, which
    proves nothing either way). A client sending neither is no browser, so no visitor's session is at stake.
    """
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is None or origin == "null" or urlsplit(origin).netloc == request.host


def create_preview_blueprint(resources: Sequence[dict[str, Any]] | None) -> Blueprint:
    """The page; `resources` are the demo's (None outside `demo`: only the FHIR server form)."""
    bp = Blueprint(
        "preview",
        __name__,
        template_folder="preview_ui/templates",
        static_folder="preview_ui/static",
        static_url_path="/preview-static",
    )
    patients = demo_patients(resources) if resources is not None else []
    by_id = {p.id: p for p in patients}

    def page(status: int = 200, **result: Any) -> Response:
        service = next(iter(services().values()))
        html = render_template(
            "preview.html",
            service=service,
            patients=patients,
            feedback_url=url_for("cds.feedback", service_id=service.id),
            form=request.form,
            **result,
        )
        return Response(html, status=status, content_type="text/html; charset=utf-8")

    @bp.get("/")
    def show() -> Response:
        return page()

    @bp.post("/")
    def run() -> Response:
        if not _same_origin():
            abort(403)
        service = next(iter(services().values()))
        form = request.form
        if form.get("source") == "demo":
            patient = by_id.get(form.get("patient", ""))
            if patient is None or _DEMO_FHIR_BLUEPRINT not in current_app.blueprints:
                return page(400, problem="Choose one of the demo patients listed.")
            body = hook_request(service, own_fhir_base(request.environ), patient.id, None)
            return page(patient=patient, call=call_hook(service, body))
        fhir_server = form.get("fhir_server", "").strip()
        patient_id = form.get("patient_id", "").strip()
        token = form.get("token", "").strip() or None
        if not fhir_server or len(fhir_server) > _MAX_URL:
            return page(400, problem="Give the FHIR server's base URL (e.g. https://sandbox.example/r4).")
        if not is_fhir_id(patient_id):
            return page(400, problem="Give the patient's FHIR id (letters, digits, '-' and '.', at most 64).")
        if token is not None and len(token) > _MAX_TOKEN:
            return page(400, problem="The token is too long.")
        body = hook_request(service, fhir_server, patient_id, token)
        return page(call=call_hook(service, body))

    @bp.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        # Not no-referrer: with it Chromium sends `Origin: null` on our own form posts.
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    return bp

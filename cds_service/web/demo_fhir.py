"""A read-only FHIR R4 endpoint over in-memory resources, so the demo exercises the same fetch path
an EHR's FHIR server does (read, the search parameters our prefetch templates use, paging).

Not a general FHIR server: unknown search parameters are ignored, as FHIR allows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, request
from werkzeug.datastructures import CombinedMultiDict, MultiDict

FHIR_JSON = "application/fhir+json"
DEFAULT_COUNT = 50
MAX_COUNT = 1000
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
# The CodeableConcept the `code` search parameter reads, where it is not `code`.
_CODE_FIELD = {
    "MedicationRequest": "medicationCodeableConcept",
    "MedicationStatement": "medicationCodeableConcept",
    "MedicationAdministration": "medicationCodeableConcept",
}


def _fhir(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype=FHIR_JSON)


def _outcome(status: int, code: str, diagnostics: str) -> Response:
    issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
    return _fhir({"resourceType": "OperationOutcome", "issue": [issue]}, status)


def _flatten(resources: Iterable[dict]) -> tuple[dict[tuple[str, str], dict], dict[str, str]]:
    """Index resources by (type, id); Bundles are unpacked, and their urn:uuid fullUrls remembered
    so references written as `urn:uuid:…` (transaction bundles) still match."""
    index: dict[tuple[str, str], dict] = {}
    aliases: dict[str, str] = {}

    def add(resource: dict, full_url: str | None) -> None:
        rtype = resource.get("resourceType")
        if rtype == "Bundle":
            for entry in resource.get("entry") or []:
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    add(entry["resource"], entry.get("fullUrl"))
            return
        if not isinstance(rtype, str):
            return
        rid = resource.get("id")
        if not rid and full_url and full_url.startswith("urn:uuid:"):
            rid = full_url.removeprefix("urn:uuid:")
            resource = {**resource, "id": rid}
        if not rid:
            rid = f"anon-{len(index) + 1}"
            resource = {**resource, "id": rid}
        index[(rtype, str(rid))] = resource
        if full_url:
            aliases[full_url] = f"{rtype}/{rid}"

    for item in resources:
        add(item, None)
    return index, aliases


def _ref_parts(reference: str) -> tuple[str | None, str]:
    """`Patient/1`, `http://x/fhir/Patient/1/_history/2` or a bare `1` -> (type, id)."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and _TYPE.match(parts[-2]):
        return parts[-2], parts[-1]
    return None, parts[-1]


def _matches_reference(resource: dict, fields: tuple[str, ...], value: str, aliases: dict[str, str]) -> bool:
    want_type, want_id = _ref_parts(value)
    want_type = want_type or "Patient"
    if resource.get("resourceType") == want_type and resource.get("id") == want_id:
        return True  # a patient is in its own compartment
    for name in fields:
        field = resource.get(name)
        reference = field.get("reference") if isinstance(field, dict) else None
        if isinstance(reference, str):
            have_type, have_id = _ref_parts(aliases.get(reference, reference))
            if have_id == want_id and have_type in (None, want_type):
                return True
    return False


def _matches_token(codings: list[Any], value: str) -> bool:
    for token in value.split(","):
        system, _, code = token.rpartition("|") if "|" in token else (None, "", token)
        for coding in codings:
            if not isinstance(coding, dict):
                continue
            if system is None:
                hit = coding.get("code") == code
            elif system == "":  # `|code`: a code with no system
                hit = coding.get("code") == code and not coding.get("system")
            else:
                hit = coding.get("system") == system and (code == "" or coding.get("code") == code)
            if hit:
                return True
    return False


def _codings(resource: dict) -> list[Any]:
    concept = resource.get(_CODE_FIELD.get(resource.get("resourceType", ""), "code"))
    return (concept.get("coding") or []) if isinstance(concept, dict) else []


def create_fhir_blueprint(
    resources: list[dict], url_prefix: str = "/fhir", *, name: str = "demo_fhir"
) -> Blueprint:
    """A Blueprint serving `resources` (resources or Bundles of them) read-only as a FHIR R4 server."""
    index, aliases = _flatten(resources)
    types = sorted({rtype for rtype, _ in index})
    bp = Blueprint(name, __name__, url_prefix=url_prefix)

    @bp.after_request
    def cors(response: Response) -> Response:
        # Browser-based CDS clients (sandbox, EHR simulator) read this endpoint cross-origin.
        response.headers["Access-Control-Allow-Origin"] = "*"
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Accept, Content-Type"
            )
            response.headers["Access-Control-Max-Age"] = "86400"
        return response

    @bp.get("/metadata")
    def metadata() -> Response:
        search_params = [
            {"name": n, "type": t}
            for n, t in (
                ("_id", "token"),
                ("patient", "reference"),
                ("subject", "reference"),
                ("code", "token"),
            )
        ]
        return _fhir(
            {
                "resourceType": "CapabilityStatement",
                "status": "active",
                "date": "2025-01-01",
                "kind": "instance",
                "software": {"name": "crc-cds-service demo FHIR endpoint"},
                "implementation": {
                    "description": "Read-only demo data",
                    "url": request.base_url.rsplit("/", 1)[0],
                },
                "fhirVersion": "4.0.1",
                "format": ["json"],
                "rest": [
                    {
                        "mode": "server",
                        "resource": [
                            {
                                "type": rtype,
                                "interaction": [{"code": "read"}, {"code": "search-type"}],
                                "searchParam": search_params,
                            }
                            for rtype in types
                        ],
                    }
                ],
            }
        )

    @bp.get("/<rtype>/<rid>")
    def read(rtype: str, rid: str) -> Response:
        resource = index.get((rtype, rid))
        if resource is None:
            return _outcome(404, "not-found", f"{rtype}/{rid} is not known")
        return _fhir(resource)

    @bp.get("/<rtype>")
    @bp.post("/<rtype>/_search")
    def search(rtype: str) -> Response:
        if not _TYPE.match(rtype):
            return _outcome(404, "not-supported", f"{rtype!r} is not a resource type")
        # FHIR's POST search (the CDS Hooks sandbox tries it first): parameters in a form body, URL ones too.
        args: MultiDict[str, str] = request.args
        if request.method == "POST":
            if request.mimetype != "application/x-www-form-urlencoded":
                return _outcome(
                    415, "not-supported", "a POST search takes an application/x-www-form-urlencoded body"
                )
            args = CombinedMultiDict([request.args, request.form])
        try:
            count = min(MAX_COUNT, max(0, int(args.get("_count", DEFAULT_COUNT))))
            offset = max(0, int(args.get("_offset", 0)))
        except ValueError:
            return _outcome(400, "invalid", "_count and _offset must be integers")

        matches = [r for (t, _), r in index.items() if t == rtype]
        for ids in args.getlist("_id"):
            matches = [r for r in matches if r.get("id") in ids.split(",")]
        for param, fields in (("patient", ("patient", "subject")), ("subject", ("subject",))):
            # Repeated parameters AND together; a comma inside one ORs.
            for value in args.getlist(param):
                matches = [
                    r
                    for r in matches
                    if any(_matches_reference(r, fields, v, aliases) for v in value.split(","))
                ]
        for value in args.getlist("code"):
            matches = [r for r in matches if _matches_token(_codings(r), value)]

        page = matches[offset : offset + count] if count else []
        kept = [(k, v) for k, v in args.items(multi=True) if k not in ("_count", "_offset")]

        search_url = request.base_url.removesuffix("/_search")

        def page_url(at: int) -> str:  # a GET, also for a POST search: every parameter is in it
            return f"{search_url}?{urlencode([*kept, ('_count', count), ('_offset', at)])}"

        links = [{"relation": "self", "url": page_url(offset)}]
        if count and offset + count < len(matches):
            links.append({"relation": "next", "url": page_url(offset + count)})
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "link": links,
        }
        base = search_url.rsplit("/", 1)[0]
        if page:
            bundle["entry"] = [
                {
                    "fullUrl": f"{base}/{r['resourceType']}/{r['id']}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in page
            ]
        return _fhir(bundle)

    @bp.get("/", defaults={"rest": ""})
    @bp.get("/<path:rest>")
    def unknown(rest: str) -> Response:
        return _outcome(404, "not-supported", "this demo FHIR endpoint serves only metadata, read and search")

    return bp

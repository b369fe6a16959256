"""The CDS Hooks 2.0 wire format as pydantic v2 models, and the JSON rule for answers.

Requests are parsed leniently (unknown fields kept, as the spec allows extensions) but strictly
where the service depends on a field. Answers are dumped without empty optional fields: CDS Hooks
clients must never see `null`, `""`, `[]` or `{}` (only `"cards": []`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BadRequest


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --- request ---------------------------------------------------------------------------------


class FhirAuthorization(_Model):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None


class PatientViewContext(_Model):
    patientId: str = Field(min_length=1)
    userId: str | None = None
    encounterId: str | None = None


class HookRequest(_Model):
    hook: str = Field(min_length=1)
    hookInstance: str = Field(min_length=1)
    context: PatientViewContext
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    prefetch: dict[str, Any] | None = None

    @field_validator("prefetch")
    @classmethod
    def _prefetch_is_fhir(cls, prefetch: dict[str, Any] | None) -> dict[str, Any] | None:
        # Each value is null (the EHR found nothing) or a FHIR resource; anything else is not FHIR.
        for key, value in (prefetch or {}).items():
            if value is None:
                continue
            if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
                raise ValueError(f"prefetch {key!r} is neither null nor a FHIR resource")
        return prefetch


def parse_hook_request(body: Any, expected_hook: str) -> HookRequest:
    """Validate a decoded request body; raise BadRequest with a short, safe message."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        request = HookRequest.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(f"invalid CDS Hooks request: {_first_error(exc)}") from None
    if request.hook != expected_hook:
        raise BadRequest(f"this service answers the {expected_hook!r} hook, not {request.hook!r}")
    return request


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    msg = err.get("msg", "invalid")
    if err.get("type") == "missing":
        return f"{where} is required"
    return f"{where}: {msg.removeprefix('Value error, ')}"


# --- answer ----------------------------------------------------------------------------------


class Coding(_Model):
    system: str | None = None
    code: str
    display: str | None = None


class Link(_Model):
    label: str
    url: str
    type: Literal["absolute", "smart"] = "absolute"
    appContext: str | None = None


class Source(_Model):
    label: str
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


class Action(_Model):
    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None
    resourceId: list[str] | None = None


class Suggestion(_Model):
    label: str
    uuid: str | None = None
    isRecommended: bool | None = None
    actions: list[Action] = Field(default_factory=list)


class Card(_Model):
    uuid: str | None = None
    summary: str = Field(max_length=139)
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[Suggestion] = Field(default_factory=list)
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[Coding] = Field(default_factory=list)
    links: list[Link] = Field(default_factory=list)
    extension: dict[str, Any] | None = None


class CardsResponse(_Model):
    cards: list[Card] = Field(default_factory=list)


class DiscoveryService(_Model):
    hook: str
    id: str
    title: str
    description: str
    prefetch: dict[str, str] = Field(default_factory=dict)
    usageRequirements: str | None = None


class Discovery(_Model):
    services: list[DiscoveryService]


# --- the JSON rule ---------------------------------------------------------------------------


def prune(value: Any) -> Any:
    """Drop keys whose value is None, "", [] or {} (recursively)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            item = prune(item)
            if item is None or item == "" or item == [] or item == {}:
                continue
            out[key] = item
        return out
    if isinstance(value, list):
        return [prune(v) for v in value]
    return value


def answer_json(response: CardsResponse) -> dict[str, Any]:
    cards = [prune(card.model_dump(mode="json")) for card in response.cards]
    return {"cards": cards}


def dumps(document: Any) -> str:
    """The one serialisation of every answer: HTTP and `cds-service evaluate` print the same bytes."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))

"""The CDS Hooks 2.0 wire format as pydantic v2 models, and the JSON rule for answers.

Requests are parsed leniently (unknown fields kept, as the spec allows extensions) but strictly
where the service depends on a field. Answers are dumped without empty optional fields: CDS Hooks
clients must never see `null`, `""`, `[]` or `{}` (only `"cards": []`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cds_service.errors import BadRequest


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


def _printable(value: str) -> str:
    if not value.isprintable():  # control characters, line and paragraph separators
        raise ValueError("must be printable characters only (a UUID, in CDS Hooks 2.0)")
    return value


# A UUID in CDS Hooks 2.0; stored and logged, so short and printable whatever a client sends.
HookInstance = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)]


class HookRequest(_Model):
    hook: str = Field(min_length=1)
    hookInstance: HookInstance
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


class CallValues(_Model):
    """The members that change from one call for a chart to the next, validated as in HookRequest:
    all a request needs checked when it is the bytes of a valid one with only these changed."""

    hookInstance: HookInstance
    fhirAuthorization: FhirAuthorization | None = None


def valid_call_values(hook_instance: Any, fhir_authorization: Any) -> bool:
    values = {"hookInstance": hook_instance}
    if fhir_authorization is not None:
        values["fhirAuthorization"] = fhir_authorization
    try:
        CallValues.model_validate(values)
    except ValidationError:
        return False
    return True


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


# --- feedback (CDS Hooks 2.0 §Feedback) -------------------------------------------------------


class FeedbackCoding(_Model):
    system: str | None = None
    code: str = Field(min_length=1)
    display: str | None = None


class AcceptedSuggestion(_Model):
    id: str = Field(min_length=1)


class OverrideReason(_Model):
    reason: FeedbackCoding | None = None
    userComment: str | None = Field(default=None, max_length=10_000)


class FeedbackEntry(_Model):
    card: str
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] = Field(default_factory=list)
    overrideReason: OverrideReason | None = None
    # REQUIRED by the spec, but nothing here depends on it: a client that omits it still counts.
    outcomeTimestamp: dt.datetime | None = None

    @field_validator("card")
    @classmethod
    def _card_is_uuid(cls, card: str) -> str:
        try:
            return str(uuid.UUID(card))  # canonical lower-case form, as our cards carry it
        except ValueError:
            raise ValueError("card must be the uuid of a card this service returned") from None

    @field_validator("outcomeTimestamp")
    @classmethod
    def _utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        # The spec says UTC; a timestamp without an offset is read as UTC rather than refused.
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value

    @model_validator(mode="after")
    def _outcome_fields(self) -> FeedbackEntry:
        # "accepted" with no suggestions is a card taken as read (acceptedSuggestions is 0..* in the
        # spec's model, and real clients send it so): stored, not refused.
        if self.outcome == "overridden" and self.acceptedSuggestions:
            raise ValueError("an overridden card has no acceptedSuggestions")
        return self


class FeedbackRequest(_Model):
    feedback: list[FeedbackEntry] = Field(min_length=1)


def parse_feedback(body: Any) -> list[FeedbackEntry]:
    """The entries of a feedback POST: the 2.0 `{"feedback": [...]}` or, leniently, one entry."""
    if not isinstance(body, dict):
        raise BadRequest("the feedback body must be a JSON object")
    if "feedback" not in body and not {"card", "outcome"} & body.keys():
        raise BadRequest('the feedback body needs a "feedback" array (CDS Hooks 2.0)')
    wrapped = body if "feedback" in body else {"feedback": [body]}
    try:
        return FeedbackRequest.model_validate(wrapped).feedback
    except ValidationError as exc:
        raise BadRequest(f"invalid feedback: {_first_error(exc)}") from None


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
    # Only containers are recursed into: a card has ~150 leaves, and a call per leaf was most of the
    # cost. A pruned container is empty exactly when it equals [] or {}.
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                item = prune(item)
                if not item:
                    continue
            elif item is None or item == "":
                continue
            out[key] = item
        return out
    if isinstance(value, list):
        return [prune(v) if isinstance(v, (dict, list)) else v for v in value]
    return value


def answer_json(cards: list[Card]) -> dict[str, Any]:
    """The CardsResponse document of already-built cards, with no empty optional fields."""
    return {"cards": [prune(card.model_dump(mode="json")) for card in cards]}

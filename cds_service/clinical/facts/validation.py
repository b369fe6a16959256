"""fhir.resources R4B validation of the resources the facts are read from: the one place the facts
validate. Only the elements the facts read are validated (read_elements.py says which, and why);
a picked resource whose read elements are not valid FHIR is skipped and named, never guessed at."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from cds_service.clinical.facts.model import PatientFacts
from cds_service.clinical.facts.rawjson import json_str
from cds_service.clinical.facts.read_elements import READ_MODELS
from cds_service.clinical.fhir_fields import ref_of
from cds_service.clinical.kept import KeptLru

log = logging.getLogger("cds_service.facts")  # the name operators filter on, kept across the move


def validated(model: Any, resource: dict[str, Any], facts: PatientFacts) -> Any | None:
    """The elements of the resource the facts read, as an instance of `model` trimmed to them
    (read_elements.READ_MODELS: the same attribute names; shared, read it, never change it), or
    None when they are not valid FHIR (then logged and named in `facts.skipped`)."""
    read, keys = READ_MODELS[model], _READ_KEYS[model]
    elements = {k: resource[k] for k in keys if k in resource}
    key = _content_key(read, elements)
    outcome = OUTCOMES.get(key) if key is not None else None
    if outcome is None:
        outcome = _validate(read, elements)
        if key is not None:
            OUTCOMES.put(key, outcome)
    if not isinstance(outcome, tuple):
        return outcome
    where = ref_of(resource) or json_str(resource.get("resourceType")) or "resource"
    log.warning("skipped %s: not valid FHIR R4 (%s)", where, ", ".join(outcome))
    facts.skipped.append(where)
    return None


# The JSON names of the elements each trimmed model holds (not fhir_comments, which no fact reads).
_READ_KEYS = {
    model: tuple(f.alias or n for n, f in read.model_fields.items() if n != "fhir_comments")
    for model, read in READ_MODELS.items()
}


def _validate(model: Any, resource: dict[str, Any]) -> Any:
    """A `model` instance, or the problems (field paths) that make the resource invalid."""
    try:
        problems = _dates_not_strings(resource)
        if not problems:
            return model.model_validate(_with_kept_elements(model, resource))
    except ValidationError as exc:
        # Field paths only: the offending values may be PHI.
        problems = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})[:3]
    except (KeyError, TypeError, ValueError) as exc:
        # fhir.resources itself trips over some shapes (a contained resource of no known type).
        problems = [type(exc).__name__]
    return tuple(problems)


# Validation with fhir.resources costs 0.04-0.07 ms a resource even trimmed to the elements read. An
# EHR sends the same resources again each time the chart is opened (patient-view), so each outcome
# is kept by content. The key is the exact JSON text of the elements read, keys sorted: only a
# resource identical in those gets a kept outcome back, whichever call or patient sent it (a new
# meta.versionId changes nothing read), so what is accepted or refused is what validating it again
# would give. Kept: the model or the problems, the least recently used dropped first, bounded in
# number and in bytes of JSON so that no chart can make the cache large.
CACHE_ENTRIES = 1024
CACHE_JSON_BYTES = 2_000_000
_LARGEST_KEPT = 64_000  # bytes of JSON: larger read elements are validated every time
# What orjson would write as something JSON does not hold (a datetime, a str subclass) raises
# instead; NaN and infinities, which it writes as null, are kept out by the null test below.
_KEY_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _content_key(model: Any, resource: Any) -> tuple[Any, bytes] | None:
    try:
        text = orjson.dumps(resource, option=_KEY_OPTIONS)
    except TypeError:  # beyond orjson: integers over 64 bits, lone surrogates, non-JSON values
        return None
    if len(text) > _LARGEST_KEPT or b"null" in text:
        return None
    return model, text


def _outcomes(entries: int, json_bytes: int) -> KeptLru[tuple[Any, bytes], Any]:
    """Kept outcomes by (model, the JSON text of the elements read), sized by that text."""
    return KeptLru(entries, json_bytes, lambda key: len(key[1]))


OUTCOMES = _outcomes(CACHE_ENTRIES, CACHE_JSON_BYTES)


# A new patient's resources are new (their ids, dates and values differ), but most of what they hold
# was seen before: the same codes, statuses and body sites in every chart. So each complex element
# read (an object or a list: a CodeableConcept, a Period, a Quantity, a list of References) is also
# validated on its own, with the field fhir.resources declares for it, and kept valid by its exact
# JSON text like the outcomes above; the resource is then validated with the kept element models in
# place, which fhir.resources takes as they are. Whether an element is valid FHIR does not depend on
# the resource around it, so this accepts and refuses what validating it in place would. An invalid
# element is not kept: it is validated again with its resource, which names it by its path.
ELEMENT_ENTRIES = 1024
ELEMENT_JSON_BYTES = 500_000
ELEMENTS = _outcomes(ELEMENT_ENTRIES, ELEMENT_JSON_BYTES)
_ADAPTERS: dict[Any, dict[str, TypeAdapter[Any]]] = {}
for _read in READ_MODELS.values():
    _ADAPTERS[_read] = {f.alias or n: TypeAdapter(f.annotation) for n, f in _read.model_fields.items()}


def _with_kept_elements(model: Any, elements: dict[str, Any]) -> dict[str, Any]:
    """`elements` (a dict of our own) with each complex element replaced by its kept model."""
    adapters = _ADAPTERS[model]
    for name, value in elements.items():
        if type(value) is not dict and type(value) is not list:
            continue  # a primitive: cheaper validated in place than looked up
        adapter = adapters[name]
        key = _content_key(adapter, value)
        kept = ELEMENTS.get(key) if key is not None else None
        if kept is None:
            try:
                kept = adapter.validate_python(value)
            except (ValidationError, KeyError, TypeError, ValueError):
                continue  # validated again with its resource, which names the problem
            if key is not None:
                ELEMENTS.put(key, kept)
        elements[name] = kept
    return elements


# The date elements the facts are read from. FHIR JSON writes dates as strings; fhir.resources
# would take a number as seconds since 1970 (a date 20210101 would become 1970-08-22).
_DATE_ELEMENTS = (
    "onsetDateTime",
    "recordedDate",
    "abatementDateTime",
    "performedDateTime",
    "effectiveDateTime",
    "effectiveInstant",
    "issued",
    "authoredOn",
    "occurrenceDateTime",
)
_PERIOD_ELEMENTS = ("onsetPeriod", "performedPeriod", "effectivePeriod", "occurrencePeriod")


def _dates_not_strings(resource: dict[str, Any]) -> list[str]:
    bad = [k for k in _DATE_ELEMENTS if k in resource and type(resource[k]) is not str]
    for key in _PERIOD_ELEMENTS:
        period = resource.get(key)
        if type(period) is dict:
            bad += [f"{key}.{k}" for k in ("start", "end") if k in period and type(period[k]) is not str]
    return bad

"""fhir.resources R4B validation of the resources the facts are read from: the one place the facts
validate. A picked resource that is not valid FHIR is skipped and named, never guessed at."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from cds_service.clinical.facts.model import PatientFacts
from cds_service.clinical.facts.rawjson import json_str
from cds_service.clinical.fhir_fields import ref_of

log = logging.getLogger("cds_service.facts")  # the name operators filter on, kept across the move


def validated(model: Any, resource: dict[str, Any], facts: PatientFacts) -> Any | None:
    try:
        problems = _dates_not_strings(resource)
        if not problems:
            return model.model_validate(resource)
    except ValidationError as exc:
        # Field paths only: the offending values may be PHI.
        problems = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})[:3]
    except (KeyError, TypeError, ValueError) as exc:
        # fhir.resources itself trips over some shapes (a contained resource of no known type).
        problems = [type(exc).__name__]
    where = ref_of(resource) or json_str(resource.get("resourceType")) or "resource"
    log.warning("skipped %s: not valid FHIR R4 (%s)", where, ", ".join(problems))
    facts.skipped.append(where)
    return None


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

"""The dates facts are dated by, from validated resources."""

from __future__ import annotations

import datetime as dt

from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.procedure import Procedure

from cds_service.clinical.fhir_fields import as_date, last_day


def condition_onset(condition: Condition) -> dt.date | None:
    return as_date(
        condition.onsetDateTime or (condition.onsetPeriod.start if condition.onsetPeriod else None)
    )


def condition_date(condition: Condition) -> dt.date | None:
    return condition_onset(condition) or as_date(condition.recordedDate)


def condition_date_last(condition: Condition) -> dt.date | None:
    """The last day `condition_date` may stand for (a partial date is a range, §8.25)."""
    onset = condition.onsetDateTime or (condition.onsetPeriod.start if condition.onsetPeriod else None)
    return last_day(onset) if as_date(onset) else last_day(condition.recordedDate)


def procedure_date_last(procedure: Procedure) -> dt.date | None:
    performed = procedure.performedDateTime or (
        procedure.performedPeriod.start if procedure.performedPeriod else None
    )
    return last_day(performed)


def procedure_date(procedure: Procedure) -> dt.date | None:
    performed = procedure.performedDateTime or (
        procedure.performedPeriod.start if procedure.performedPeriod else None
    )
    return as_date(performed)


def observation_date(observation: Observation) -> dt.date | None:
    effective = observation.effectiveDateTime or (
        observation.effectivePeriod.start if observation.effectivePeriod else None
    )
    return as_date(effective) or as_date(observation.effectiveInstant) or as_date(observation.issued)


def observation_date_last(observation: Observation) -> dt.date | None:
    """The last day `observation_date` may stand for (a partial date is a range, §8.25)."""
    effective = observation.effectiveDateTime or (
        observation.effectivePeriod.start if observation.effectivePeriod else None
    )
    if as_date(effective):
        return last_day(effective)
    return as_date(observation.effectiveInstant) or as_date(observation.issued)

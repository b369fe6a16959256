"""Observation → serum CEA results, and the dispatch of staging and tumour-size Observations."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from functools import cmp_to_key
from typing import Any

from fhir.resources.R4B.observation import Observation

from cds_service.clinical.chart import Chart
from cds_service.clinical.facts.context import read_history, read_molecular
from cds_service.clinical.facts.model import CeaResult, PatientFacts, latest_cea
from cds_service.clinical.facts.rawjson import json_str, measured_number
from cds_service.clinical.facts.staging import OtherDiseases, read_staging
from cds_service.clinical.facts.tumors import tumor_size
from cds_service.clinical.facts.validation import validated
from cds_service.clinical.fhir_fields import as_date, as_instant, last_day, ref_of
from cds_service.clinical.knowledge.terminology import Terminology


def _fmt(number: float) -> str:
    return f"{number:.6g}"


_COMPARATORS = {"<", "<=", ">", ">="}


def _unit_text(value: Any) -> str | None:
    return value.strip() or None if type(value) is str else None


def cea_from_raw(raw: dict[str, Any], term: Terminology, unconvertible: bool) -> CeaResult:
    # Runs once per CEA result of the chart (hundreds in a long follow-up): kept to plain dict reads.
    source = ref_of(raw)
    period = raw.get("effectivePeriod")
    effective = (
        raw.get("effectiveDateTime")
        or (period.get("start") if type(period) is dict else None)
        or raw.get("effectiveInstant")
        or raw.get("issued")
    )
    when = as_date(effective)
    found = raw.get("valueQuantity")
    quantity: dict[str, Any] = found if type(found) is dict else {}
    value = measured_number(quantity.get("value"))
    if value is None:
        text = raw.get("valueString")
        shown = text if isinstance(text, str) else "no value"
        return CeaResult(source, when, None, None, shown, "not a numeric result", raw)
    comparator = quantity.get("comparator")
    comparator = comparator if type(comparator) is str and comparator in _COMPARATORS else None
    code = _unit_text(quantity.get("code"))
    system = quantity.get("system")
    # A UCUM code says exactly what the unit is; otherwise the human-readable unit, then any code.
    unit = (
        (code if type(system) is str and system in term.ucum_systems else None)
        or _unit_text(quantity.get("unit"))
        or code
    )
    shown = f"{comparator or ''}{_fmt(value)} {unit or '(no unit)'}"
    if unconvertible:
        # Short: the card quotes it in the factor table and in its chart line (a molar mass or the
        # assay's calibrator would be needed: docs/terminology.md).
        why = f"{unit or 'molar or arbitrary units'}: no safe conversion to ng/mL"
        return CeaResult(source, when, None, comparator, shown, why, raw)
    factor = term.cea_units.get(term.cea_unit_aliases.get(unit or "", unit or ""))
    if factor is None:
        why = f"unit {unit!r} cannot be converted to ng/mL" if unit else "no unit given"
        return CeaResult(source, when, None, comparator, shown, why, raw)
    if when is None:
        return CeaResult(source, None, None, comparator, shown, "no date", raw)
    last = last_day(effective)
    return CeaResult(
        source,
        when,
        value * factor,
        comparator,
        shown,
        None,
        raw,
        as_instant(effective),
        last if last != when else None,
    )


def read_observations(chart: Chart, term: Terminology, facts: PatientFacts) -> None:
    # Keyed by (system, code) strings; a raw coding may hold anything, so the lookup is typed loosely.
    index: dict[tuple[Any, Any], tuple[str, str]] = term.observation_index
    staging: list[tuple[Observation, str, str]] = []
    for raw in chart.of_type("Observation"):
        # The hot loop of large charts (every Observation passes here): one dict lookup per coding,
        # inline, since a call per Observation costs a quarter of the loop.
        code, concept = raw.get("code"), None
        codings_ = code.get("coding") if type(code) is dict else None
        if type(codings_) is list:
            for coding in codings_:
                if type(coding) is dict:
                    try:
                        concept = index.get((coding.get("system"), coding.get("code")))
                    except TypeError:  # a list or an object where a string belongs
                        continue
                    if concept is not None:
                        break
        if concept is None:
            continue
        what, kind = concept
        if not chart.claim(raw):
            continue
        if what == "size":
            size = tumor_size(raw, facts, term)
            if size is not None:
                facts.tumor_sizes.append(size)
            continue
        if what == "cea":
            # Read from the raw JSON: a long CEA history is validated lazily (validate_used_cea).
            if json_str(raw.get("status")) in term.cea_statuses:
                facts.cea.append(cea_from_raw(raw, term, unconvertible=kind == "unconvertible"))
            continue
        observation = validated(Observation, raw, facts)
        if observation is None:
            continue
        if what == "history":
            read_history(observation, kind, term, facts)
        elif what == "molecular":
            read_molecular(observation, kind, term, facts)
        elif observation.status in term.tnm_statuses:
            staging.append((observation, what, kind))
    sort_cea(facts.cea)
    read_staging(staging, term, facts, OtherDiseases(chart, term))


def sort_cea(results: list[CeaResult]) -> None:
    """The CEA rule's order (factors.pick_cea picks the last), docs/clinical-rules.md §8.24.

    Two results that both carry a time are ordered by their instant, compared in UTC, whatever
    calendar day each shows in its own time zone (23:30 in New York on the 10th comes after 02:00
    UTC on the 11th). Otherwise by calendar day; on one day a result without a time cannot be
    ordered against the others: they tie, and the higher value counts (it sorts last). Unreadable
    results sort first within a tie, then by source, so the order never depends on the chart's.
    """
    untimed = {c.date for c in results if c.ng_ml is not None and c.instant is None}

    def timed(c: CeaResult) -> bool:
        return c.instant is not None and c.date not in untimed

    def compare(a: CeaResult, b: CeaResult) -> int:
        if timed(a) and timed(b) and a.instant != b.instant:
            assert a.instant is not None and b.instant is not None
            return -1 if a.instant < b.instant else 1
        if not (timed(a) and timed(b)) and a.date != b.date:
            return -1 if (a.date or dt.date.min) < (b.date or dt.date.min) else 1
        ka, kb = _tie_key(a), _tie_key(b)
        return (ka > kb) - (ka < kb)

    # A total order first (day, then instant), so the comparison sort below starts from the same
    # sequence whatever order the chart listed the results in.
    results.sort(key=lambda c: (c.date or dt.date.min, *_tie_key(c)))
    results.sort(key=cmp_to_key(compare))


def _tie_key(c: CeaResult) -> tuple[float, float, str]:
    instant = c.instant.timestamp() if c.instant is not None else 0.0
    return (-1.0 if c.ng_ml is None else c.ng_ml, instant, c.source or "")


def validate_used_cea(facts: PatientFacts, cutoffs: set[dt.date | None]) -> None:
    """Validate, with fhir.resources, each CEA a CEA rule could pick (the latest before each cutoff).

    A picked result that is not valid FHIR becomes unreadable and the next one is tried, so the
    clinical core only ever uses validated CEA Observations.
    """
    checked: set[int] = set()
    for cutoff in cutoffs:
        while True:
            candidates = [
                r
                for r in facts.cea
                if r.ng_ml is not None and r.date and (cutoff is None or (r.surely_before or r.date) < cutoff)
            ]
            if not candidates:
                break
            pick, _ = latest_cea(candidates)  # facts.cea is in the rule's order
            if id(pick) in checked:
                break
            checked.add(id(pick))
            if validated(Observation, pick.raw, facts) is not None:
                break
            index = facts.cea.index(pick)
            facts.cea[index] = replace(pick, ng_ml=None, unreadable="not valid FHIR R4")
            checked.add(id(facts.cea[index]))

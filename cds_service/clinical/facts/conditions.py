"""Condition → primaries and metastases (and the primary's Condition.stage)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fhir.resources.R4B.condition import Condition

from cds_service.clinical.chart import Chart
from cds_service.clinical.facts.dates import condition_date, condition_date_last, condition_onset
from cds_service.clinical.facts.model import UNREADABLE, Entry, Metastasis, NodalEvidence, PatientFacts
from cds_service.clinical.facts.rawjson import json_list
from cds_service.clinical.facts.staging import kind_of, stage_value
from cds_service.clinical.facts.validation import validated
from cds_service.clinical.fhir_fields import codings, codings_of_list, display_of, raw_codings, ref_of
from cds_service.clinical.knowledge.terminology import Coding, Terminology

_EXCLUDED_VERIFICATION = {"entered-in-error", "refuted"}


def _verification(condition: Condition) -> set[str]:
    return {code for _, code in codings(condition.verificationStatus)}


def read_conditions(chart: Chart, term: Terminology, facts: PatientFacts) -> list[Condition]:
    """Primaries and metastases; returns the primary's Conditions that carry a stage (validated)."""
    primary_dates: list[dt.date] = []
    primary_lasts: list[dt.date] = []
    onsets: list[dt.date] = []
    staged: list[Condition] = []
    for raw in chart.of_type("Condition"):
        found = raw_codings(raw.get("code"))
        concept = term.condition_concept(found)
        if concept is None:
            _read_context_condition(raw, found, chart, term, facts)
            continue
        if not chart.claim(raw):
            continue
        condition = validated(Condition, raw, facts)
        if condition is None:
            if concept.kind != "primary" and concept.site is not term.sites["lung"]:
                # Coded as a metastasis but not readable: it may be outside the lung, so the
                # extrapulmonary factor must not read "none" (it reads unknown, naming it).
                facts.metastases.append(Metastasis(ref_of(raw), None, UNREADABLE, "unknown", None))
            continue
        if _verification(condition) & _EXCLUDED_VERIFICATION:
            continue
        source = ref_of(condition)
        when = condition_date(condition)
        last = condition_date_last(condition)
        when_last = last if last != when else None
        if concept.kind == "primary":
            if source:
                facts.primaries.append(source)
                if term.rectal_primary.any(found):
                    facts.rectal_primary.append(source)
                if raw.get("stage"):
                    staged.append(condition)
            if when:
                primary_dates.append(when)
                primary_lasts.append(when_last or when)
            onset = condition_onset(condition)
            if onset:
                onsets.append(onset)
            continue
        body_organ = term.organ_of_body_site(codings_of_list(condition.bodySite))
        site = concept.site
        if site is None and body_organ and concept.kind == "unspecified":
            site = term.sites[body_organ]
        if concept.kind == "lymphangitic":
            # Counted as pulmonary unless the body site names another organ (spec choice).
            if body_organ in (None, "lung"):
                facts.metastases.append(
                    Metastasis(
                        source,
                        "lung",
                        "lymphangitic carcinomatosis",
                        "lung",
                        when,
                        "lymphangitic",
                        detected_last=when_last,
                    )
                )
            continue
        if concept.kind == "effusion":
            facts.metastases.append(
                Metastasis(
                    source, "pleura", "malignant pleural effusion", "thoracic", when, "pleural-effusion"
                )
            )
            continue
        status = _status(condition, term)
        if site is None:
            facts.metastases.append(
                Metastasis(
                    source, None, "site not coded", "unknown", when, status=status, detected_last=when_last
                )
            )
        else:
            body_sites = codings_of_list(condition.bodySite)
            side = None
            if site.organ == "lung":
                sides = [
                    s for s, codes in term.lung_sides.items() if codes.any(found) or codes.any(body_sites)
                ]
                side = sides[0] if len(sides) == 1 else None
            facts.metastases.append(
                Metastasis(
                    source,
                    site.organ,
                    site.display,
                    site.region,
                    when,
                    "site",
                    frozenset(body_sites),
                    side=side,
                    status=status,
                    detected_last=when_last,
                )
            )
    facts.primary_diagnosis = min(primary_dates, default=None)
    facts.primary_diagnosis_last = min(primary_lasts, default=None)
    facts.primary_onset = min(onsets, default=None)
    facts.primaries.sort()
    facts.metastases.sort(key=lambda m: (m.organ or "~", m.detected or dt.date.max, m.source or ""))
    return staged


def _status(condition: Condition, term: Terminology) -> str | None:
    """Unconfirmed (histology to confirm) or resolved (confirm current disease): context, §8.27."""
    if _verification(condition) & term.unconfirmed_verification:
        return "unconfirmed"
    if {code for _, code in codings(condition.clinicalStatus)} & term.resolved_clinical:
        return "resolved"
    return None


def _read_context_condition(
    raw: dict[str, Any], found: list[Coding], chart: Chart, term: Terminology, facts: PatientFacts
) -> None:
    """A Condition that is neither the colorectal primary nor a coded metastasis: another primary
    cancer (§8.27), or a metastasis recorded only as text (§8.26). Read from the raw JSON, cheap
    tests first: most Conditions of a problem list are neither."""
    other = term.other_primary_cancer.any(found)
    text = None
    if not other:
        code = raw.get("code")
        texts = [code.get("text")] if type(code) is dict else []
        texts += [
            c.get("display")
            for c in json_list(code.get("coding") if type(code) is dict else None)
            if type(c) is dict
        ]
        text = next((t for t in texts if type(t) is str and term.text_metastasis.search(t)), None)
        if text is None:
            return
    if not chart.claim(raw):
        return
    condition = validated(Condition, raw, facts)
    if condition is None or _verification(condition) & _EXCLUDED_VERIFICATION:
        return
    if other:
        shown = display_of(condition.code) or "another cancer (coded)"
        facts.other_primaries.append(Entry(ref_of(condition), shown, condition_date(condition)))
    elif text is not None:
        facts.text_metastases.append(Entry(ref_of(condition), text.strip(), condition_date(condition)))


def read_condition_stages(staged: list[Condition], term: Terminology, facts: PatientFacts) -> None:
    """Condition.stage.summary of the colorectal primary (plain US Core data).

    `staged`: the primary's Conditions as validated by read_conditions, in chart order (they are
    not validated a second time).
    """
    for condition in staged:
        for stage in condition.stage or []:
            value_kind, group, shown = stage_value(stage.summary, term)
            if group is None:
                continue
            type_kind = kind_of(codings(stage.type), term.stage_group)
            kind = value_kind or type_kind or "unspecified"
            facts.nodal.append(
                NodalEvidence(ref_of(condition), condition_date(condition), kind, "stage", group, shown)
            )

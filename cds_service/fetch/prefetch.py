"""Prefetch resolution: turn a hook call's prefetch (plus FHIR fetches for what is missing) into a Chart.

CDS Hooks 2.0 prefetch states, per key: absent, or an OperationOutcome (the EHR hit an error)
→ fetch it from fhirServer; `null` → the EHR found nothing, never fetched again; a Bundle, whose
`link[next]` pages are followed when the EHR sent only the first page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from cds_service.clinical.chart import Chart, build_chart
from cds_service.clinical.fhir_fields import is_fhir_id, raw_codings
from cds_service.clinical.knowledge.terminology import terminology
from cds_service.errors import FetchError, PrefetchInvalid
from cds_service.fetch.budget import CallBudget
from cds_service.fetch.bundles import bundle_resources, check_shape
from cds_service.fetch.client import FetchReport, fetch_queries, has_next_link
from cds_service.fetch.policy import check_patient_id
from cds_service.hooks.catalogue import Service, fill_template
from cds_service.hooks.models import HookRequest
from cds_service.settings import Settings

log = logging.getLogger("cds_service.fhir_data")  # the name operators filter on, kept across the move


@dataclass
class ChartSource:
    """How the chart was obtained: for the audit trail and `evaluate --fhir-server`."""

    prefetched: tuple[str, ...] = ()
    fetched: tuple[str, ...] = ()  # also the prefetch Bundles whose next pages the service read
    report: FetchReport | None = None
    # Optional data the FHIR server refused or did not send in time: (prefetch key, generic cause).
    unavailable: tuple[tuple[str, str], ...] = ()

    @property
    def fhir_mode(self) -> str:
        if not self.fetched:
            return "prefetch"
        return "fhir" if not self.prefetched else "partial-prefetch"


def _out_of_scope_by_conditions(conditions: list[dict[str, Any]]) -> bool:
    """True when the Conditions alone show no colorectal cancer with lung or liver metastases.

    Lets an out-of-scope call answer at once, without fetching anything else.
    """
    term = terminology()
    crc = met = False
    for resource in conditions:
        concept = term.condition_concept(raw_codings(resource.get("code")))
        if concept is None:
            continue
        crc = crc or concept.kind == "primary"
        # Site-less metastasis codes may name the lung or liver in bodySite: let facts.py decide.
        met = (
            met
            or concept.kind in ("unspecified", "lymphangitic")
            or (concept.site is not None and concept.site.organ in ("lung", "liver"))
        )
    return not (crc and met)


# A failed search of these is a 412; any other key (and a Medication read) is optional: refused or out
# of time, it is "no data of that kind", listed as unavailable on the cards.
REQUIRED_KEYS = ("patient", "conditions", "observations", "procedures")
MEDICATION_READS = "medication-reads"


def resolve_chart(
    request: HookRequest, service: Service, settings: Settings, *, issuer: str | None = None
) -> tuple[Chart, ChartSource]:
    patient_id = request.context.patientId
    encoded_id = check_patient_id(patient_id)
    context = {"context.patientId": encoded_id, "context.userId": request.context.userId}
    given = request.prefetch or {}
    resolved: dict[str, dict[str, Any] | None] = {}
    missing: dict[str, str] = {}
    paged: dict[str, dict[str, Any]] = {}
    entries: dict[str, dict[str, list[dict[str, Any]]]] = {}  # each Bundle's resources, extracted once
    for key, template in service.prefetch.items():
        value = given.get(key, ...)
        if value is not ... and value is not None and value["resourceType"] == "OperationOutcome":
            value = ...  # the EHR could not prefetch it: fetch it ourselves
        if value is ...:
            query = fill_template(template, context)
            if query is None:
                raise PrefetchInvalid(
                    f"prefetch {key!r} cannot be fetched: its template needs a missing context value"
                )
            missing[key] = query
            continue
        if value is not None:
            items = check_shape(key, value, key in service.search_keys)
            if items is not None:
                entries[key] = items
                if has_next_link(value):
                    paged[key] = value
        resolved[key] = value

    source = ChartSource(prefetched=tuple(sorted(resolved)))
    # Only worth checking when something would be fetched: with the whole chart prefetched,
    # derive_facts stops after the Conditions anyway.
    if (
        (missing or paged)
        and "conditions" in resolved
        and "conditions" not in paged
        and _out_of_scope_by_conditions(entries.get("conditions", {}).get("Condition", []))
    ):
        return build_chart(patient_id, None, []), source

    token = request.fhirAuthorization.access_token if request.fhirAuthorization else None
    if (missing or paged) and not request.fhirServer:
        needed = ", ".join(sorted([*missing, *paged]))
        raise FetchError(f"prefetch {needed} not provided and the request has no fhirServer to read it from")
    # One budget for everything this call fetches; missing searches and unfinished prefetch pages
    # run side by side, so the total is the slowest chain, not the sum.
    with CallBudget(settings) as budget:
        if missing or paged:
            fetched, report = fetch_queries(
                request.fhirServer or "",
                token,
                missing,
                budget,
                follow=paged,
                required=REQUIRED_KEYS,
                patient_key="patient" if "patient" in missing else None,
                issuer=issuer,
            )
            for key in [*missing, *paged]:
                entries.pop(key, None)
                resolved[key] = fetched.get(key)
            for key in report.unavailable:
                resolved.pop(key, None)
            source = ChartSource(
                prefetched=tuple(sorted(set(resolved) - set(missing))),
                fetched=tuple(sorted([*missing, *paged])),
                report=report,
                unavailable=tuple(report.unavailable.items()),
            )
        chart = _chart_from(patient_id, resolved, entries, service)
        chart.unread = frozenset(_resource_type(service, key) for key, _ in source.unavailable)
        wanted = _unresolved_medications(chart, request.fhirServer)
        if wanted and request.fhirServer and not _out_of_scope_by_conditions(chart.of_type("Condition")):
            source = _fetch_medications(chart, wanted, request.fhirServer, token, budget, source, issuer)
    return chart, source


_MEDICATION_TYPES = ("MedicationRequest", "MedicationAdministration", "MedicationStatement")
# Reads per call at most: one for each drug a patient is on is a handful.
MAX_MEDICATION_READS = 20


def _unresolved_medications(chart: Chart, fhir_server: str | None) -> list[str]:
    """Ids of the Medications the patient's medication resources point to but the chart lacks.

    The prefetch asks for them with `_include`, which a FHIR server may ignore (CDS Hooks does not
    require it); without them an order coded only through its Medication names no drug, and an
    on-treatment CEA could make the patient look low-risk (§8.4).
    """
    have = {m.get("id") for m in chart.of_type("Medication") if type(m.get("id")) is str}
    base = (fhir_server or "").rstrip("/") + "/"
    wanted: set[str] = set()
    for rtype in _MEDICATION_TYPES:
        for raw in chart.of_type(rtype):
            ref = raw.get("medicationReference")
            target = ref.get("reference") if isinstance(ref, dict) else None
            if not isinstance(target, str) or not chart.claim(raw):
                continue
            target = target.split("/_history/")[0]
            if target.startswith(base):
                target = target[len(base) :]
            rtype_, _, rid = target.partition("/")
            if rtype_ == "Medication" and is_fhir_id(rid) and rid not in have:
                wanted.add(rid)
    return sorted(wanted)[:MAX_MEDICATION_READS]


def _fetch_medications(
    chart: Chart,
    ids: list[str],
    fhir_server: str,
    token: str | None,
    budget: CallBudget,
    source: ChartSource,
    issuer: str | None,
) -> ChartSource:
    reads = {f"Medication/{rid}": f"Medication/{quote(rid, safe='')}" for rid in ids}
    fetched, report = fetch_queries(fhir_server, token, reads, budget, required=(), issuer=issuer)
    found = [r for r in fetched.values() if r is not None and r.get("resourceType") == "Medication"]
    chart.resources.setdefault("Medication", []).extend(found)
    unavailable = source.unavailable
    if report.unavailable:
        chart.unread |= {"Medication"}
        # One line for all of them: which drug could not be read says nothing more to the clinician.
        unavailable = (*unavailable, (MEDICATION_READS, sorted(set(report.unavailable.values()))[0]))
    if source.report is not None:
        report = FetchReport(
            source.report.searches + report.searches,
            source.report.seconds + report.seconds,
            {**source.report.unavailable, **report.unavailable},
        )
    return ChartSource(source.prefetched, (*source.fetched, "medications"), report, unavailable)


def _resource_type(service: Service, key: str) -> str:
    """The resource type an optional prefetch key reads (what the clinical core is told is unread)."""
    if key == MEDICATION_READS:
        return "Medication"
    return service.prefetch[key].split("?", 1)[0].strip("/").split("/", 1)[0]


def _chart_from(
    patient_id: str,
    resolved: dict[str, dict[str, Any] | None],
    entries: dict[str, dict[str, list[dict[str, Any]]]],
    service: Service,
) -> Chart:
    patient: dict[str, Any] | None = None
    groups: list[dict[str, list[dict[str, Any]]]] = []
    for key, value in resolved.items():
        if value is None:
            continue
        if value.get("resourceType") == "Bundle":
            items = entries[key] if key in entries else bundle_resources(value, key)
            if key in service.search_keys:
                groups.append(items)
            elif items.get("Patient"):
                patient = items["Patient"][0]
        elif value.get("resourceType") == "Patient":
            patient = value
        else:
            raise FetchError(f"the FHIR server answered {key!r} with a {value.get('resourceType')}")
    return build_chart(patient_id, patient, groups)

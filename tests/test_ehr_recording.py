"""EHR recording patterns, each answered in both modes: with full prefetch, and with no prefetch at all
(the service searches a real FHIR server over HTTP, pages of at most 50 entries so long searches page).

Every expected answer is worked out by hand from docs/clinical-rules.md (the section is named on each
test); the two modes must give the same cards.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from cds_service.web.demo_fhir import create_fhir_blueprint

from .builders import (
    CPT,
    ICD10CM,
    ICD10CM_OID,
    LIVER_BODY_SITE,
    LOINC,
    LUNG_BODY_SITE,
    RXNORM,
    SNOMED,
    cea,
    concept,
    condition,
    crc,
    liver_met,
    lung_met,
    n_category,
    patient,
    procedure,
    resection,
    tumor,
    tumor_size,
)
from .card_checks import assert_answer_reads_in_ten_seconds
from .conftest import SERVICE_URL, hook_body

PAGE = 50  # the test FHIR server's largest page, whatever _count asks


class _Charts:
    """A loopback FHIR server holding one chart per prefix (`/c<n>/fhir`), built on demand."""

    def __init__(self) -> None:
        self.apps: dict[str, Flask] = {}
        self.lock = threading.Lock()

    def add(self, resources: list[dict[str, Any]]) -> str:
        with self.lock:
            key = f"c{len(self.apps) + 1}"
            app = Flask(key)
            app.register_blueprint(create_fhir_blueprint(copy.deepcopy(resources), f"/{key}/fhir"))
            self.apps[key] = app
        return f"/{key}/fhir"

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Any:
        # Cap every page at PAGE entries: the service asks for large pages, real servers may refuse.
        query = environ.get("QUERY_STRING", "")
        environ["QUERY_STRING"] = re.sub(
            r"_count=(\d+)", lambda m: f"_count={min(int(m.group(1)), PAGE)}", query
        )
        key = environ.get("PATH_INFO", "").split("/")[1]
        app = self.apps.get(key)
        if app is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no such chart"]
        return app.wsgi_app(environ, start_response)


@pytest.fixture(scope="module")
def fhir_charts() -> Iterator[tuple[str, _Charts]]:
    charts = _Charts()
    server = make_server("127.0.0.1", 0, charts, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", charts
    server.shutdown()


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "uuid"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


@pytest.fixture
def answer(client, fhir_charts) -> Callable[..., list[dict[str, Any]]]:
    """The cards for a chart, asserted equal in prefetch and no-prefetch (FHIR search) mode."""
    origin, charts = fhir_charts

    def run(*resources: dict[str, Any]) -> list[dict[str, Any]]:
        if not any(r["resourceType"] == "Patient" for r in resources):
            resources = (patient(), *resources)
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": r} for r in resources],
        }
        prefetched = client.post(SERVICE_URL, json=hook_body(bundle, hook_instance="same"))
        assert prefetched.status_code == 200, prefetched.get_data(as_text=True)
        body = hook_body(bundle, hook_instance="same")
        body.pop("prefetch")
        body["fhirServer"] = origin + charts.add(list(resources))
        body["fhirAuthorization"] = {
            "access_token": "tok",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "test",
        }
        fetched = client.post(SERVICE_URL, json=body)
        assert fetched.status_code == 200, fetched.get_data(as_text=True)
        assert _strip(fetched.get_json()) == _strip(prefetched.get_json())
        cards = prefetched.get_json()["cards"]
        assert_answer_reads_in_ten_seconds(cards, "EHR recording pattern")  # §7 on every pattern's cards
        return cards

    return run


def card(cards: list[dict[str, Any]], model: str) -> dict[str, Any]:
    found = [c for c in cards if c["extension"]["crc-cds-assessment"]["model"] == model]
    assert len(found) == 1, [c["summary"] for c in cards]
    return found[0]


def lung(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return card(cards, "cai-2025-lung")["extension"]["crc-cds-assessment"]


def liver(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return card(cards, "fong-crs-liver")["extension"]["crc-cds-assessment"]


def status(assessment: dict[str, Any], fid: str) -> str:
    return next(f["status"] for f in assessment["factors"] if f["id"] == fid)


def factor(assessment: dict[str, Any], fid: str) -> dict[str, Any]:
    return next(f for f in assessment["factors"] if f["id"] == fid)


def context_ids(assessment: dict[str, Any]) -> set[str]:
    return {c["id"] for c in assessment.get("context", [])}


# A lung chart with three factors settled and absent (resected 2019-02-01, lung metastasis 2021-03-01:
# DFI 25.0 months; pN0; no other site), so the CEA decides the group.
LUNG_BASE = (
    crc(onset="2019-01-10"),
    resection("2019-02-01"),
    n_category("pathologic", "1229947003"),
    lung_met(onset="2021-03-01"),
)
# A liver chart (resected 2019-02-01, liver metastasis 2021-03-01: 25 months, pN0, one Tumor of 3 cm).
LIVER_BASE = (
    crc(onset="2019-01-10"),
    resection("2019-02-01"),
    n_category("pathologic", "1229947003"),
    liver_met(onset="2021-03-01"),
    tumor(id="t1", related="Condition/liver-met"),
    tumor_size(3.0, focus="BodyStructure/t1", date="2021-03-02"),
)


def service_request(code: str, status: str, *, system: str = SNOMED, body_site: str | None = None) -> dict:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": f"sr-{status}",
        "status": status,
        "intent": "order",
        "code": concept(system, code),
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2021-03-20",
    }
    if body_site:
        resource["bodySite"] = [concept(SNOMED, body_site)]
    return resource


def medication_request(date: str, *, code: str = "32592", id: str = "oxali") -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": id,
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": concept(RXNORM, code),
        "subject": {"reference": "Patient/p1"},
        "authoredOn": date,
    }


# --- codes as EHRs send them (docs/terminology.md §2) -------------------------------------------------


def test_a_primary_coded_c78_5_is_the_colorectal_cancer_not_a_site(answer):
    cards = answer(
        condition(ICD10CM, "C78.5", onset="2019-01-10", id="crc"),
        resection("2019-02-01"),
        condition(ICD10CM, "C78.01", onset="2021-03-01", id="lung-met"),
        cea(3.0, date="2021-02-20"),
    )
    a = lung(cards)
    assert status(a, "extrapulmonary_metastases") == "absent"


def test_icd10cm_under_its_oid_and_without_the_dot(answer):
    cards = answer(
        condition(ICD10CM_OID, "C180", onset="2019-01-10", id="crc"),
        resection("2019-02-01"),
        condition(ICD10CM_OID, "C7801", onset="2021-03-01", id="lung-met"),
        condition(ICD10CM, "C7951", onset="2021-03-01", id="bone-met"),
    )
    assert status(lung(cards), "extrapulmonary_metastases") == "present"


def test_a_site_less_metastasis_code_with_a_lung_body_site_is_a_lung_metastasis(answer):
    cards = answer(
        *LUNG_BASE[:3],
        condition(SNOMED, "128462008", onset="2021-03-01", body_site=LUNG_BODY_SITE, id="lung-met"),
        cea(3.0, date="2021-02-20"),
    )
    a = lung(cards)
    assert a["recommendation"] == "upfront-local-therapy"
    assert status(a, "extrapulmonary_metastases") == "absent"


def test_a_right_upper_arm_body_site_is_not_the_lung(answer):
    # SNOMED 368209003 is the right upper arm (the FHIR specification's blood-pressure example): a
    # site-less metastasis there may lie outside the lung, so the extrapulmonary factor is unknown.
    cards = answer(
        *LUNG_BASE,
        condition(SNOMED, "128462008", onset="2021-03-01", body_site="368209003", id="met-arm"),
        cea(3.0, date="2021-02-20"),
    )
    a = lung(cards)
    assert status(a, "extrapulmonary_metastases") == "unknown"
    assert a["recommendation"] == "complete-risk-data"


def test_onset_period_dates_the_metastasis(answer):
    # Resected 2019-02-01, onsetPeriod.start 2020-12-01: 669 days = 21.98 months < 24.
    cards = answer(*LUNG_BASE[:3], condition(SNOMED, "94391008", onset_start="2020-12-01", id="lung-met"))
    f = factor(lung(cards), "dfi_lt_24m")
    assert (f["status"], f["date"]) == ("present", "2020-12-01")


# --- what did not happen (docs/clinical-rules.md §2) -------------------------------------------------


@pytest.mark.parametrize("surgery_status", ["not-done", "entered-in-error"])
def test_a_cancelled_resection_does_not_date_the_dfi(answer, surgery_status):
    cards = answer(crc(), resection("2019-02-01", status=surgery_status), lung_met(onset="2021-03-01"))
    f = factor(lung(cards), "dfi_lt_24m")
    assert f["status"] == "unknown" and "no primary tumour resection" in f["reason"]


@pytest.mark.parametrize("surgery_status", ["not-done", "entered-in-error"])
def test_a_cancelled_lung_wedge_is_no_local_therapy(answer, surgery_status):
    wedge = procedure(SNOMED, "232632009", surgery_status, performed="2021-04-01")
    cards = answer(*LUNG_BASE, cea(3.0, date="2021-02-20"), wedge)
    assert lung(cards)["recommendation"] == "upfront-local-therapy"


@pytest.mark.parametrize(
    ("request_status", "expected"), [("revoked", "upfront-local-therapy"), ("active", "ablation-guidance")]
)
def test_a_revoked_ablation_order_is_no_plan(answer, request_status, expected):
    order = service_request("426987001", request_status)  # radiofrequency ablation of lung
    cards = answer(*LUNG_BASE, cea(3.0, date="2021-02-20"), order)
    assert lung(cards)["recommendation"] == expected


# --- CEA as laboratories report it (docs/clinical-rules.md §2, §8.12, §8.13, §8.24) ------------------


def test_preliminary_and_entered_in_error_cea_are_not_used(answer):
    cards = answer(
        *LUNG_BASE,
        cea(3.0, date="2021-02-01", id="final"),
        cea(40.0, date="2021-02-15", status="preliminary"),
        cea(50.0, date="2021-02-20", status="entered-in-error"),
    )
    f = factor(lung(cards), "cea_gt_5")
    assert (f["status"], f["sources"]) == ("absent", ["Observation/final"])


def test_timed_results_are_ordered_by_their_instant_across_a_utc_offset(answer):
    # 23:30 on 10 February in New York is 04:30 UTC on the 11th: later than 02:00 UTC on the 11th.
    cards = answer(
        *LUNG_BASE,
        cea(4.1, date="2021-02-10T23:30:00-05:00", id="evening"),
        cea(6.3, date="2021-02-11T02:00:00Z", id="night"),
    )
    f = factor(lung(cards), "cea_gt_5")
    assert (f["status"], f["sources"]) == ("absent", ["Observation/evening"])


def test_an_evening_result_keeps_its_own_day_against_the_start_of_chemotherapy(answer):
    # Drawn the evening before the first oxaliplatin (local time): a pre-treatment CEA.
    cards = answer(
        *LUNG_BASE,
        cea(9.0, date="2021-03-14T21:00:00-05:00", id="evening"),
        medication_request("2021-03-15"),
    )
    a = lung(cards)
    assert a["recommendation"] == "assess-nat-response"
    assert factor(a, "cea_gt_5")["sources"] == ["Observation/evening"]


def test_a_valuestring_cea_is_named_not_used(answer):
    text_result = cea(None, date="2021-02-20", value_string="7.1 ng/mL", id="text")
    cards = answer(*LUNG_BASE, cea(3.0, date="2021-02-01", id="numeric"), text_result)
    a = lung(cards)
    assert factor(a, "cea_gt_5")["sources"] == ["Observation/numeric"]
    assert "7.1 ng/mL" in card(cards, "cai-2025-lung")["detail"]


def test_120_cea_results_across_pages_the_latest_counts(answer):
    results = [cea(3.0, date=f"2020-{1 + i // 28:02d}-{1 + i % 28:02d}", id=f"c{i}") for i in range(119)]
    results.append(cea(7.5, date="2021-02-25", id="latest"))
    cards = answer(*LUNG_BASE, *results)
    f = factor(lung(cards), "cea_gt_5")
    assert (f["status"], f["sources"]) == ("present", ["Observation/latest"])


@pytest.mark.parametrize(
    ("value", "comparator", "lung_status", "liver_status"),
    [
        (500.0, ">", "present", "present"),  # every value it allows is over 5 and over 200
        (0.5, "<", "absent", "absent"),
        (200.0, None, "present", "absent"),  # exactly 200 is not > 200 ng/mL
        (5.0, None, "absent", "absent"),  # exactly 5.0 is not > 5.0 ng/mL
        (5.0, ">=", "unknown", "unknown"),  # >= 5 may be 5.0, or over 200
    ],
)
def test_cea_comparators_and_exact_thresholds(answer, value, comparator, lung_status, liver_status):
    result = cea(value, date="2021-02-20", comparator=comparator)
    cards = answer(*LUNG_BASE, liver_met(onset="2021-03-01"), tumor(id="t1"), result)
    assert status(lung(cards), "cea_gt_5") == lung_status
    assert status(liver(cards), "cea_gt_200") == liver_status


@pytest.mark.parametrize(
    ("size", "unit", "expected"),
    [(5.0, "cm", "absent"), (50, "mm", "absent"), (5.1, "cm", "present"), (51, "mm", "present")],
)
def test_a_liver_lesion_of_exactly_5_cm_is_not_over_5_cm(answer, size, unit, expected):
    cards = answer(*LIVER_BASE[:5], tumor_size(size, unit, focus="BodyStructure/t1", date="2021-03-02"))
    assert status(liver(cards), "largest_liver_metastasis_gt_5cm") == expected


# --- interval boundaries: days / 30.4375 (docs/clinical-rules.md §2, §8.3) ----------------------------


@pytest.mark.parametrize(
    ("resected", "found", "expected"),
    [
        ("2021-01-10", "2023-01-10", "present"),  # 730 days = 23.98 months < 24
        ("2019-02-01", "2021-02-01", "absent"),  # 731 days (a leap year between) = 24.02 months
    ],
)
def test_dfi_at_24_months(answer, resected, found, expected):
    cards = answer(crc(onset="2018-12-01"), resection(resected), lung_met(onset=found))
    assert status(lung(cards), "dfi_lt_24m") == expected


@pytest.mark.parametrize(("found", "expected"), [("2020-02-01", "present"), ("2020-02-02", "absent")])
def test_liver_timing_at_12_months(answer, found, expected):
    # Resected 2019-02-01: 365 days = 11.99 months (< 12), 366 days = 12.02 months.
    cards = answer(crc(onset="2019-01-10"), resection("2019-02-01"), liver_met(onset=found), tumor(id="t1"))
    assert status(liver(cards), "dfi_lt_12m") == expected


@pytest.mark.parametrize(
    ("found", "evidence"),
    [
        ("2020-07-01", "li-2019-systemic-first-synchronous"),  # 182 days = 5.98 months: synchronous
        ("2020-07-02", "li-2019-surgery-first"),  # 183 days = 6.01 months: metachronous
    ],
)
def test_synchronous_at_6_months(answer, found, evidence):
    cards = answer(crc(onset="2020-01-01"), lung_met(onset=found), cea(12.0, date="2020-06-20"))
    a = lung(cards)
    assert a["recommendation"] == "consider-nat"
    assert evidence in a["evidence"]


# --- staging as mCODE records it (docs/clinical-rules.md §8.5) ----------------------------------------


def test_an_mcode_stage_group_lends_its_focus_to_the_n_category_it_lists(answer):
    n_obs = n_category("pathologic", "1229951001", focus=None, id="pn")  # pN1, no focus of its own
    group = {
        "resourceType": "Observation",
        "id": "stage",
        "status": "final",
        "code": concept(LOINC, "21902-2"),
        "subject": {"reference": "Patient/p1"},
        "focus": [{"reference": "Condition/crc"}],
        "effectiveDateTime": "2019-02-10",
        "valueCodeableConcept": concept(SNOMED, "1222806003"),  # IIIC
        "hasMember": [{"reference": "Observation/pn"}],
    }
    cards = answer(
        crc(onset="2019-01-10"), resection("2019-02-01"), lung_met(onset="2021-03-01"), n_obs, group
    )
    f = factor(lung(cards), "node_positive_primary")
    assert f["status"] == "present"


# --- context (docs/clinical-rules.md §8.27) -----------------------------------------------------------


def test_a_second_primary_is_a_context_line(answer):
    cards = answer(*LUNG_BASE, condition(ICD10CM, "C34.11", onset="2020-06-01", id="nsclc"))
    assert "other-primary-cancer" in context_ids(lung(cards))


# --- treatment as EHRs record it (docs/clinical-rules.md §2, §8.4, §8.23) ----------------------------


def test_mcode_sbrt_of_the_lung_is_local_therapy_done(answer):
    sbrt = procedure(SNOMED, "1217123003", performed="2021-04-01", body_site=LUNG_BODY_SITE)
    cards = answer(*LUNG_BASE, cea(3.0, date="2021-02-20"), sbrt)
    assert lung(cards)["recommendation"] == "post-local-therapy-follow-up"


def test_radiotherapy_elsewhere_is_not_lung_sbrt(answer):
    sbrt = procedure(SNOMED, "1217123003", performed="2021-04-01", body_site=LIVER_BODY_SITE)
    cards = answer(*LUNG_BASE, cea(3.0, date="2021-02-20"), sbrt)
    assert lung(cards)["recommendation"] == "upfront-local-therapy"


def test_a_medication_known_by_its_ingredient(answer):
    medication = {
        "resourceType": "Medication",
        "id": "folfox-bag",
        "code": {"text": "Chemotherapy infusion bag"},
        "ingredient": [{"itemCodeableConcept": concept(RXNORM, "32592")}],  # oxaliplatin
    }
    order = medication_request("2021-03-15")
    order.pop("medicationCodeableConcept")
    order["medicationReference"] = {"reference": "Medication/folfox-bag"}
    cards = answer(*LUNG_BASE, cea(12.0, date="2021-03-05"), cea(2.0, date="2021-05-01"), medication, order)
    a = lung(cards)
    assert a["recommendation"] == "assess-nat-response"
    assert status(a, "cea_gt_5") == "present"  # the CEA before oxaliplatin, not the on-treatment 2.0


def test_medication_administrations_put_the_liver_card_on_treatment(answer):
    given = {
        "resourceType": "MedicationAdministration",
        "id": "given",
        "status": "completed",
        "medicationCodeableConcept": concept(RXNORM, "1736776"),  # an oxaliplatin clinical drug
        "subject": {"reference": "Patient/p1"},
        "effectivePeriod": {"start": "2021-03-20T09:00:00Z", "end": "2021-03-20T11:00:00Z"},
    }
    cards = answer(*LIVER_BASE, given)
    assert liver(cards)["recommendation"] == "assess-nac-response"


def test_liver_ablation_is_local_therapy_done(answer):
    ablation = procedure(CPT, "47382", performed="2021-05-01")  # percutaneous RF ablation of liver tumour
    cards = answer(*LIVER_BASE, ablation)
    assert liver(cards)["recommendation"] == "post-local-therapy-follow-up"


@pytest.mark.parametrize(("code", "counts"), [("877015", False), ("1670310", False), ("1312397", False)])
def test_drugs_that_are_not_the_systemic_therapy_the_rules_count(answer, code, counts):
    # Levoleucovorin (a leucovorin form: no chemotherapy on its own), trifluridine/tipiracil and
    # regorafenib (the clinical rules' list excludes them; docs/clinical-decisions.md).
    cards = answer(*LUNG_BASE, cea(12.0, date="2021-03-05"), medication_request("2021-03-15", code=code))
    assert (lung(cards)["recommendation"] == "assess-nat-response") is counts


def test_a_total_colectomy_with_ileoanal_anastomosis_dates_the_dfi(answer):
    cards = answer(crc(), procedure(CPT, "44153", performed="2019-02-01"), lung_met(onset="2021-03-01"))
    assert status(lung(cards), "dfi_lt_24m") == "absent"  # 25.0 months


# --- partial dates everywhere a date is used (docs/clinical-rules.md §8.25; docs/clinical-decisions.md) -


def test_the_first_of_two_resections_one_recorded_as_a_year(answer):
    # "2019" and 2019-03-10: the first resection lies between 2019-01-01 and 2019-03-10, not anywhere
    # in 2019. Lung metastasis 2021-04-01: 753 to 821 days = 24.7 to 27.0 months, never under 24.
    cards = answer(
        crc(onset="2018-12-01"),
        resection("2019", id="r-year"),
        resection("2019-03-10", id="r-day"),
        lung_met(onset="2021-04-01"),
    )
    assert status(lung(cards), "dfi_lt_24m") == "absent"


def test_the_first_of_two_resections_on_the_liver_side(answer):
    # Liver metastasis 2020-03-20: 376 to 444 days after the first resection = 12.4 to 14.6 months.
    cards = answer(
        crc(onset="2018-12-01"),
        resection("2019", id="r-year"),
        resection("2019-03-10", id="r-day"),
        liver_met(onset="2020-03-20"),
        tumor(id="t1"),
    )
    assert status(liver(cards), "dfi_lt_12m") == "absent"


def test_chemotherapy_recorded_as_a_year_may_be_for_the_metastases(answer):
    # Oxaliplatin "2021", lung metastasis 2021-03-01: it may have begun on or after the metastasis, so
    # it is treated as therapy for it (state, and no CEA from 2021-03-01 on is pre-treatment).
    cards = answer(
        *LUNG_BASE,
        cea(9.0, date="2021-02-20", id="before"),
        cea(2.0, date="2021-06-01", id="after"),
        medication_request("2021"),
    )
    a = lung(cards)
    assert a["recommendation"] == "assess-nat-response"
    assert factor(a, "cea_gt_5")["sources"] == ["Observation/before"]
    assert "prior-systemic-therapy" not in context_ids(a)


def test_chemotherapy_recorded_as_a_year_before_the_metastasis_is_adjuvant(answer):
    cards = answer(*LUNG_BASE, cea(3.0, date="2021-02-20"), medication_request("2020"))
    a = lung(cards)
    assert a["recommendation"] == "upfront-local-therapy"
    line = next(c for c in a["context"] if c["id"] == "prior-systemic-therapy")
    assert "begun 2020-01-01 to 2020-12-31" in line["value"]


def test_a_cea_dated_by_month_is_before_surgery_only_if_the_whole_month_is(answer):
    # Wedge resection 2021-05-20; a CEA recorded as "2021-05" may be after it.
    cards = answer(
        *LUNG_BASE,
        cea(8.0, date="2021-04-20", id="april"),
        cea(2.0, date="2021-05", id="may"),
        procedure(SNOMED, "232632009", performed="2021-05-20"),
    )
    f = factor(lung(cards), "cea_gt_5")
    assert (f["status"], f["sources"]) == ("present", ["Observation/april"])


def test_a_tumour_size_dated_by_month_is_before_chemotherapy_only_if_the_whole_month_is(answer):
    # Oxaliplatin from 2021-04-10; a 6 cm size recorded as "2021-04" may be on treatment: the 3 cm of
    # 2021-03-02 is the size before treatment (§8.30).
    cards = answer(
        *LIVER_BASE,
        tumor_size(6.0, focus="BodyStructure/t1", date="2021-04"),
        medication_request("2021-04-10"),
    )
    f = factor(liver(cards), "largest_liver_metastasis_gt_5cm")
    assert (f["status"], f["value"]) == ("absent", "3.0 cm")


@pytest.mark.parametrize(
    ("born", "over_70"),
    [
        ("1950-03-02", False),  # 70 on 2021-03-01, when the lung metastases were found (73 at the call)
        ("1950-02-28", True),  # 71 then
        ("1950", False),  # 70 or 71 then: not surely over 70
        ("1949", True),  # 71 or 72 then
        ("1950-02", True),  # born by 1950-02-28: 71 then
    ],
)
def test_age_over_70_when_the_metastases_were_found(answer, born, over_70):
    person = patient()
    person["birthDate"] = born
    cards = answer(person, *LUNG_BASE)
    assert ("age-over-70" in context_ids(lung(cards))) is over_70


def test_a_contained_medication_known_by_its_ingredient(answer):
    order = medication_request("2021-03-15")
    order.pop("medicationCodeableConcept")
    order["contained"] = [
        {
            "resourceType": "Medication",
            "id": "bag",
            "ingredient": [{"itemCodeableConcept": concept(RXNORM, "1791701")}],  # injectable fluorouracil
        }
    ]
    order["medicationReference"] = {"reference": "#bag"}
    cards = answer(*LUNG_BASE, cea(12.0, date="2021-03-05"), order)
    assert lung(cards)["recommendation"] == "assess-nat-response"


def test_lung_sbrt_known_by_its_reason(answer):
    sbrt = procedure(SNOMED, "1217123003", performed="2021-04-01", reason="Condition/lung-met")
    cards = answer(*LUNG_BASE, cea(3.0, date="2021-02-20"), sbrt)
    assert lung(cards)["recommendation"] == "post-local-therapy-follow-up"


def test_a_cea_dated_by_month_ties_with_the_results_of_that_month(answer):
    # "2021-02" may be 28 February, after the 15 February result: they cannot be ordered, and the
    # higher counts (§8.24's tie rule, the safety intent of §8.4).
    cards = answer(
        *LUNG_BASE,
        cea(7.0, date="2021-02", id="month"),
        cea(3.0, date="2021-02-15", id="day"),
    )
    a = lung(cards)
    f = factor(a, "cea_gt_5")
    assert (f["status"], f["sources"]) == ("present", ["Observation/month"])
    assert "cannot be put in order" in card(cards, "cai-2025-lung")["detail"]

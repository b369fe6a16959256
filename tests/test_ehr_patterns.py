"""Charts as EHRs really record them (docs/clinical-rules.md §8.23–31): treatment on the liver side, repeat
CEA results on one day, partial dates, text-only metastases, context lines, mCODE history of
metastatic disease, a liver lesion measured twice, pleural effusion and site-less lymphangitic codes.

Each test builds a chart of real FHIR resources (tests/builders.py) and reads the cards the service
answers over HTTP (Flask test client, full prefetch); the demo patients added for these rules are
also answered in FHIR mode by tests/test_fhir_mode.py.
"""

from __future__ import annotations

from typing import Any

from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.scoring.liver import assess_liver
from cds_service.clinical.scoring.lung import assess_lung

from .builders import (
    BONE_MET_SNOMED,
    CPT,
    HEPATECTOMY_CPT,
    ICD10CM,
    LIVER_BODY_SITE,
    LOINC,
    LYMPHANGITIC_SNOMED,
    SNOMED,
    WEDGE_SNOMED,
    cea,
    chart,
    concept,
    condition,
    crc,
    liver_met,
    lung_met,
    medication_request,
    n_category,
    patient,
    procedure,
    resection,
    tumor,
    tumor_size,
)
from .card_checks import assert_answer_reads_in_ten_seconds
from .conftest import SERVICE_URL, hook_body


def _bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    if not any(r["resourceType"] == "Patient" for r in resources):
        resources = (patient(), *resources)
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def _cards(client, *resources: dict[str, Any]) -> list[dict[str, Any]]:
    resp = client.post(SERVICE_URL, json=hook_body(_bundle(*resources), hook_instance="fixed"))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    cards = resp.get_json()["cards"]
    assert_answer_reads_in_ten_seconds(cards, "EHR pattern")  # §7 on every pattern's cards
    return cards


def _card(cards: list[dict[str, Any]], model: str) -> dict[str, Any]:
    found = [c for c in cards if c["extension"]["crc-cds-assessment"]["model"] == model]
    assert len(found) == 1, [c["summary"] for c in cards]
    return found[0]


def _liver(client, *resources: dict[str, Any]) -> dict[str, Any]:
    return _card(_cards(client, *resources), "fong-crs-liver")


def _lung(client, *resources: dict[str, Any]) -> dict[str, Any]:
    return _card(_cards(client, *resources), "cai-2025-lung")


def _assessment(card: dict[str, Any]) -> dict[str, Any]:
    return card["extension"]["crc-cds-assessment"]


def _factor(card: dict[str, Any], fid: str) -> dict[str, Any]:
    return next(f for f in _assessment(card)["factors"] if f["id"] == fid)


# --- §8.23 the liver card on treatment -----------------------------------------------------------------


def test_liver_patient_on_folfox_is_asked_for_response_assessment_not_neoadjuvant_chemotherapy(client):
    high_crs = (
        crc(),
        resection(),
        n_category("pathologic", "pN1"),
        liver_met(onset="2019-06-01"),
        cea(250, date="2019-06-02"),
    )
    before = _liver(client, *high_crs)
    assert _assessment(before)["recommendation"] == "consider-neoadjuvant-chemotherapy"
    on_folfox = _liver(client, *high_crs, medication_request(authored="2019-06-20", id="folfox"))
    a = _assessment(on_folfox)
    assert a["recommendation"] == "assess-nac-response"
    assert a["score"] == _assessment(before)["score"]  # the score is computed the same way
    assert on_folfox["indicator"] == "info"
    assert "2019-06-20" in on_folfox["summary"] and "RECIST 1.1" in on_folfox["summary"]
    assert "neoadjuvant chemotherapy before hepatectomy" not in on_folfox["summary"]
    assert "RECIST 1.1" in on_folfox["detail"]


def test_adjuvant_therapy_before_the_liver_metastasis_is_not_treatment_of_it(client):
    card = _liver(
        client,
        crc(),
        resection(),
        liver_met(onset="2021-01-10"),
        cea(250, date="2021-01-05"),
        medication_request(authored="2019-03-01"),
    )
    assert _assessment(card)["recommendation"] not in ("assess-nac-response", "post-local-therapy-follow-up")


def test_local_therapy_done_wins_over_systemic_therapy_on_the_liver_card(client):
    card = _liver(
        client,
        crc(),
        resection(),
        liver_met(onset="2021-01-10"),
        medication_request(authored="2021-02-01"),
        procedure(CPT, HEPATECTOMY_CPT, performed="2021-06-01"),
    )
    assert _assessment(card)["recommendation"] == "post-local-therapy-follow-up"


def test_systemic_therapy_started_on_the_liver_metastasis_date_counts():
    facts = derive_facts(
        chart(crc(), liver_met(onset="2021-01-10"), medication_request(authored="2021-01-10"))
    )
    a = assess_liver(facts, assess_lung(facts))
    assert a is not None and a.recommendation == "assess-nac-response"


# --- §8.24 several CEA results on one day ------------------------------------------------------------


def test_results_with_times_are_ordered_by_time_not_by_value(client):
    card = _lung(
        client,
        crc(),
        resection(),
        lung_met(onset="2021-03-01"),
        cea(6.3, date="2021-02-01T08:10:00+00:00", id="morning"),
        cea(4.1, date="2021-02-01T15:45:00+00:00", id="afternoon"),
    )
    f = _factor(card, "cea_gt_5")
    assert f["sources"] == ["Observation/afternoon"] and f["status"] == "absent"


def test_times_are_compared_in_utc():
    # Both are dated 2021-02-01 where they were taken; 01:00 at UTC+9 is 16:00 UTC the day before,
    # 00:30 at UTC-5 is 05:30 UTC: the second is the later result, whatever the clock faces said.
    facts = derive_facts(
        chart(
            crc(),
            lung_met(onset="2021-03-01"),
            cea(9.0, date="2021-02-01T01:00:00+09:00", id="tokyo"),
            cea(3.0, date="2021-02-01T00:30:00-05:00", id="new-york"),
        )
    )
    a = assess_lung(facts)
    assert a is not None and a.cea.result is not None and a.cea.result.source == "Observation/new-york"


def test_results_without_times_on_one_day_tie_and_the_higher_counts_named_on_the_card(client):
    card = _lung(
        client,
        crc(),
        resection(),
        lung_met(onset="2021-03-01"),
        cea(6.3, date="2021-02-01", id="one"),
        cea(4.1, date="2021-02-01", id="two"),
    )
    f = _factor(card, "cea_gt_5")
    assert f["sources"] == ["Observation/one"] and f["status"] == "present"
    rule = _assessment(card)["cea_rule"]
    assert "2 results on 2021-02-01 without times" in rule and "higher" in rule
    assert "without times to order them" in card["detail"]


def test_a_timed_and_an_untimed_result_of_one_day_tie(client):
    card = _lung(
        client,
        crc(),
        resection(),
        lung_met(onset="2021-03-01"),
        cea(6.3, date="2021-02-01", id="untimed"),
        cea(4.1, date="2021-02-01T15:45:00Z", id="timed"),
    )
    assert _factor(card, "cea_gt_5")["sources"] == ["Observation/untimed"]


def test_results_of_different_days_are_never_a_tie(client):
    card = _lung(
        client,
        crc(),
        resection(),
        lung_met(onset="2021-03-01"),
        cea(6.3, date="2021-01-31", id="older"),
        cea(4.1, date="2021-02-01", id="newer"),
    )
    assert _factor(card, "cea_gt_5")["sources"] == ["Observation/newer"]
    assert "without times" not in _assessment(card)["cea_rule"]


# --- §8.26 metastases recorded only as text ----------------------------------------------------------


def _text_condition(text: str, id: str = "text-met", **kw: Any) -> dict[str, Any]:
    resource = condition(SNOMED, "0", id=id, **kw)
    resource["code"] = {"text": text}
    return resource


def test_a_text_only_metastasis_never_brings_a_patient_into_scope(client):
    assert _cards(client, crc(), resection(), _text_condition("Lung metastases, right lower lobe")) == []


def test_a_text_only_metastasis_makes_the_extrapulmonary_factor_unknown_and_is_quoted(client):
    card = _lung(client, crc(), resection(), lung_met(), _text_condition("Bone metastases T10, L2"))
    f = _factor(card, "extrapulmonary_metastases")
    assert f["status"] == "unknown" and "Bone metastases T10, L2" in f["reason"]
    assert f["sources"] == ["Condition/text-met"]
    context = {c["id"]: c for c in _assessment(card)["context"]}
    assert "Bone metastases T10, L2" in context["uncoded-metastasis-entry"]["value"]
    assert "Bone metastases T10, L2" in card["detail"]
    assert "none in the chart" not in card["detail"]


def test_a_text_only_entry_does_not_undo_a_coded_extrapulmonary_site(client):
    card = _lung(
        client,
        crc(),
        lung_met(),
        condition(SNOMED, BONE_MET_SNOMED, onset="2021-01-10", id="bone"),
        _text_condition("secondary malignancy of brain?"),
    )
    assert _factor(card, "extrapulmonary_metastases")["status"] == "present"


def test_a_text_only_entry_makes_one_recorded_liver_lesion_unknown(client):
    lesion = tumor(related="Condition/liver-met", id="t1")
    one = _liver(client, crc(), liver_met(), lesion)
    assert _factor(one, "multiple_liver_metastases")["status"] == "absent"
    card = _liver(client, crc(), liver_met(), lesion, _text_condition("liver mets segments 2 and 7"))
    f = _factor(card, "multiple_liver_metastases")
    assert f["status"] == "unknown" and "liver mets segments 2 and 7" in f["reason"]


def test_unrelated_text_and_refuted_text_entries_change_nothing(client):
    card = _lung(
        client,
        crc(),
        lung_met(),
        _text_condition("Hypertension"),
        _text_condition("Bone metastases", id="refuted-text", verification="refuted"),
    )
    assert _factor(card, "extrapulmonary_metastases")["status"] == "absent"


# --- §8.27 context lines ------------------------------------------------------------------------------


def _context(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in _assessment(card).get("context", [])}


RIGHT_LUNG_MET = "353561000119103"
LEFT_LUNG_MET = "353741000119106"


def test_bilateral_lung_metastases_are_a_context_line_not_a_factor(client):
    card = _lung(
        client,
        crc(),
        resection(),
        condition(SNOMED, RIGHT_LUNG_MET, onset="2021-01-10", id="right"),
        condition(ICD10CM, "C78.02", onset="2021-01-10", id="left"),
    )
    line = _context(card)["bilateral-lung-metastases"]
    assert line["sources"] == ["Condition/left", "Condition/right"] or set(line["sources"]) == {
        "Condition/left",
        "Condition/right",
    }
    one_side = _lung(client, crc(), resection(), condition(SNOMED, RIGHT_LUNG_MET, onset="2021-01-10"))
    assert "bilateral-lung-metastases" not in _context(one_side)
    assert _assessment(card)["score"] == _assessment(one_side)["score"]


def test_bilateral_from_body_sites(client):
    card = _lung(
        client,
        crc(),
        lung_met(id="a", body_site="3341006"),
        lung_met(id="b", body_site="44029006"),
    )
    assert "bilateral-lung-metastases" in _context(card)


def test_age_over_70_is_shown_from_the_birth_date(client):
    old = patient()
    old["birthDate"] = "1940-05-01"
    card = _lung(client, old, crc(), lung_met())
    line = _context(card)["age-over-70"]
    assert line["value"].startswith("age 8") and line["sources"] == ["Patient/p1"]
    assert "age-over-70" not in _context(_lung(client, crc(), lung_met()))  # born 1960


def test_rectal_primary(client):
    card = _lung(client, condition(ICD10CM, "C20", onset="2019-01-10", id="rectum"), lung_met())
    assert _context(card)["rectal-primary"]["sources"] == ["Condition/rectum"]
    assert "rectal-primary" not in _context(_lung(client, crc(), lung_met()))


def test_another_primary_cancer_including_primary_lung_cancer(client):
    card = _lung(client, crc(), lung_met(), condition(ICD10CM, "C34.11", onset="2018-01-01", id="lungca"))
    line = _context(card)["other-primary-cancer"]
    assert line["sources"] == ["Condition/lungca"] and "confirm by histology" in line["value"]
    # It is not a metastasis and changes no factor.
    assert _factor(card, "extrapulmonary_metastases")["status"] == "absent"


def test_systemic_therapy_before_the_metastasis_is_context(client):
    card = _lung(
        client, crc(), lung_met(onset="2021-01-10"), medication_request(authored="2019-03-01", id="adj")
    )
    line = _context(card)["prior-systemic-therapy"]
    assert line["sources"] == ["MedicationRequest/adj"] and "2019-03-01" in line["value"]


def test_unconfirmed_and_resolved_metastases(client):
    provisional = _lung(client, crc(), lung_met(verification="provisional", id="prov"))
    assert _context(provisional)["unconfirmed-metastasis"]["sources"] == ["Condition/prov"]
    resolved = lung_met(id="res")
    resolved["clinicalStatus"] = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved"}]
    }
    resolved["abatementDateTime"] = "2021-06-01"
    card = _lung(client, crc(), resolved)
    assert _context(card)["resolved-metastasis"]["sources"] == ["Condition/res"]
    treated = _lung(client, crc(), resolved, procedure(SNOMED, WEDGE_SNOMED, performed="2021-03-01"))
    assert "resolved-metastasis" not in _context(treated)


def _variant(genes: list[str], value: str, id: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "code": concept(LOINC, "69548-6"),
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2021-01-20",
        "valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA9633-4", "display": value}]},
        "component": [
            {
                "code": concept(LOINC, "48018-6"),
                "valueCodeableConcept": {
                    "coding": [{"system": "http://www.genenames.org/geneId", "code": g}]
                },
            }
            for g in genes
        ],
    }


def test_molecular_results_are_shown_when_charted(client):
    msi = {
        "resourceType": "Observation",
        "id": "msi",
        "status": "final",
        "code": concept(LOINC, "81695-9"),
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2021-01-20",
        "valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA14122-8", "display": "Stable"}]},
    }
    card = _lung(
        client,
        crc(),
        lung_met(),
        _variant(["HGNC:6407"], "Present", "kras"),
        _variant(["HGNC:7989", "HGNC:1097"], "Absent", "nras-braf"),
        _variant(["HGNC:3236"], "Present", "egfr"),  # another gene: not shown
        msi,
    )
    line = _context(card)["molecular-status"]
    assert set(line["sources"]) == {"Observation/kras", "Observation/nras-braf", "Observation/msi"}
    assert "KRAS: Present" in line["value"] and "BRAF/NRAS: Absent" in line["value"]
    assert "MSI: Stable" in line["value"]


def test_no_molecular_results_is_one_line(client):
    card = _lung(client, crc(), lung_met())
    line = _context(card)["molecular-status"]
    assert "not in the chart" in line["value"] and "sources" not in line
    assert card["detail"].count("not in the chart") == 1
    assert "suggestions" not in line


def test_molecular_and_history_codes_are_in_the_observations_prefetch_template():
    from cds_service.hooks.catalogue import services

    template = next(iter(services().values())).prefetch["observations"]
    for code in ("81695-9", "69548-6", "1287652008", "1098951000119108"):
        assert code in template


# --- §8.29 history of metastatic disease (mCODE HistoryOfMetastaticCancer) ------------------------------


def _history(
    code: str = "1098951000119108", *, value: bool | None = True, body_site: str | None = None, id: str = "hx"
):
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "code": concept(SNOMED, code),
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2020-06-01",
    }
    if value is not None:
        resource["valueBoolean"] = value
    if body_site is not None:
        resource["bodySite"] = concept(SNOMED, body_site)
    return resource


def test_a_history_of_liver_metastases_counts_for_the_extrapulmonary_factor_but_makes_no_liver_card(client):
    cards = _cards(client, crc(), lung_met(), _history())
    assert [_assessment(c)["model"] for c in cards] == ["cai-2025-lung"]
    f = _factor(cards[0], "extrapulmonary_metastases")
    assert f["status"] == "present" and f["sources"] == ["Observation/hx"]


def test_a_history_at_a_body_site_counts_and_a_denied_history_does_not(client):
    bone = _lung(client, crc(), lung_met(), _history("1287652008", body_site="272673000"))
    assert _factor(bone, "extrapulmonary_metastases")["status"] == "present"
    denied = _lung(client, crc(), lung_met(), _history(value=False))
    assert _factor(denied, "extrapulmonary_metastases")["status"] == "absent"
    siteless = _lung(client, crc(), lung_met(), _history("1287652008"))
    assert _factor(siteless, "extrapulmonary_metastases")["status"] == "absent"


def test_a_history_never_brings_a_patient_into_scope(client):
    assert _cards(client, crc(), _history()) == []


def test_many_context_lines_keep_the_card_within_2000_characters(client):
    old = patient()
    old["birthDate"] = "1938-02-01"
    card = _lung(
        client,
        old,
        condition(ICD10CM, "C20", onset="2019-01-10", id="rectum"),
        condition(SNOMED, RIGHT_LUNG_MET, onset="2021-01-10", id="right", verification="provisional"),
        condition(ICD10CM, "C78.02", onset="2021-01-10", id="left"),
        condition(ICD10CM, "C77.1", onset="2021-01-10", id="nodes"),
        condition(ICD10CM, "C34.11", onset="2015-01-01", id="lungca"),
        condition(ICD10CM, "C50.911", onset="2012-01-01", id="breast"),
        _text_condition("Bone metastases T10, L2 — " + "vertebral body involvement " * 8),
        medication_request(authored="2019-03-01", id="adj"),
    )
    ids = [c["id"] for c in _assessment(card)["context"]]
    assert ids == [
        "bilateral-lung-metastases",
        "age-over-70",
        "rectal-primary",
        "other-primary-cancer",
        "prior-systemic-therapy",
        "unconfirmed-metastasis",
        "thoracic-nodes",
        "uncoded-metastasis-entry",
        "molecular-status",
    ]
    assert len(card["detail"]) <= 2000
    assert "more in the card's assessment" in card["detail"]


# --- §8.30 a liver lesion measured more than once ----------------------------------------------------


def test_a_lesion_measured_before_and_after_chemotherapy_uses_the_size_before(client):
    common = (
        crc(),
        liver_met(onset="2021-01-10"),
        tumor(related="Condition/liver-met", id="t1"),
        tumor_size(6.2, focus="BodyStructure/t1", date="2021-01-12", id="before"),
        tumor_size(3.1, focus="BodyStructure/t1", date="2021-05-01", id="after"),
    )
    untreated = _liver(client, *common)
    assert _factor(untreated, "largest_liver_metastasis_gt_5cm")["sources"] == ["Observation/before"]
    treated = _liver(client, *common, medication_request(authored="2021-02-01"))
    f = _factor(treated, "largest_liver_metastasis_gt_5cm")
    assert f["status"] == "present" and f["sources"] == ["Observation/before"]


def test_the_latest_size_before_treatment_counts_not_the_largest(client):
    card = _liver(
        client,
        crc(),
        liver_met(onset="2020-06-01"),
        tumor(related="Condition/liver-met", id="t1"),
        tumor_size(6.0, focus="BodyStructure/t1", date="2020-06-05", id="first"),
        tumor_size(4.0, focus="BodyStructure/t1", date="2021-01-05", id="restaged"),
        medication_request(authored="2021-02-01"),
    )
    f = _factor(card, "largest_liver_metastasis_gt_5cm")
    assert f["status"] == "absent" and f["sources"] == ["Observation/restaged"]


def test_only_sizes_after_treatment_leave_the_size_unknown(client):
    card = _liver(
        client,
        crc(),
        liver_met(onset="2021-01-10"),
        tumor_size(3.0, focus="Condition/liver-met", date="2021-05-01", id="after"),
        medication_request(authored="2021-02-01"),
    )
    f = _factor(card, "largest_liver_metastasis_gt_5cm")
    assert f["status"] == "unknown" and "before the start of systemic therapy" in f["reason"]


# --- §8.31 malignant pleural effusion and site-less lymphangitic codes -------------------------------


def test_malignant_pleural_effusion_is_pleural_dissemination_for_a_patient_in_scope(client):
    effusion = condition(ICD10CM, "J91.0", onset="2021-02-01", id="effusion")
    card = _lung(client, crc(), resection(), lung_met(), effusion)
    assert _assessment(card)["recommendation"] == "systemic-therapy-first"
    assert _factor(card, "extrapulmonary_metastases")["status"] == "absent"  # thoracic, not extrapulmonary
    liver_only = _liver(client, crc(), liver_met(), effusion)
    assert _assessment(liver_only)["recommendation"] == "systemic-therapy-first"
    assert _cards(client, crc(), effusion) == []  # never brings a patient into scope


def test_a_lymphangitic_code_without_a_lung_metastasis_condition_is_lung_involvement(client):
    lymphangitic = condition(SNOMED, LYMPHANGITIC_SNOMED, onset="2021-02-01", id="lymph")
    card = _lung(client, crc(), resection(), lymphangitic)
    assert _assessment(card)["recommendation"] == "systemic-therapy-first"
    assert "lymphangitic" in card["detail"].lower()
    elsewhere = condition(SNOMED, LYMPHANGITIC_SNOMED, onset="2021-02-01", body_site=LIVER_BODY_SITE)
    assert _cards(client, crc(), elsewhere) == []


# --- §8.25 partial dates are ranges -------------------------------------------------------------------


def test_a_resection_recorded_as_a_year_leaves_the_liver_timing_unknown_when_the_range_straddles_12_months(
    client,
):
    # 2019-01-01 .. 2019-12-31 → 2020-03-15: 2.4 to 14.4 months, either side of 12.
    card = _liver(client, crc(), resection(performed="2019"), liver_met(onset="2020-03-15"))
    f = _factor(card, "dfi_lt_12m")
    assert f["status"] == "unknown"
    assert "2019-01-01 to 2019-12-31" in f["reason"] and "2.4 months to 14.4 months" in f["reason"]
    assert f["sources"] == ["Procedure/resection", "Condition/liver-met"]
    assert _assessment(card)["recommendation"] != "upfront-hepatectomy"


def test_a_partial_date_decides_when_the_whole_range_agrees(client):
    # 2019 → 2020-03-15 is 2.4 to 14.4 months: under 24 on every day.
    card = _lung(client, crc(), resection(performed="2019"), lung_met(onset="2020-03-15"))
    f = _factor(card, "dfi_lt_24m")
    assert f["status"] == "present" and "2019-01-01 to 2019-12-31" in f["value"]


def test_a_month_precision_resection_near_24_months_is_unknown(client):
    # 2019-05-01 .. 2019-05-31 → 2021-05-20: 23.6 to 24.6 months.
    card = _lung(client, crc(), resection(performed="2019-05"), lung_met(onset="2021-05-20"))
    f = _factor(card, "dfi_lt_24m")
    assert f["status"] == "unknown" and "2019-05-01 to 2019-05-31" in f["reason"]


def test_a_metastasis_dated_by_year_is_a_range_too(client):
    # 2019-02-01 → 2021-01-01 .. 2021-12-31: 23.0 to 34.9 months.
    card = _lung(client, crc(), resection(performed="2019-02-01"), lung_met(onset="2021"))
    f = _factor(card, "dfi_lt_24m")
    assert f["status"] == "unknown" and "2021-01-01 to 2021-12-31" in f["reason"]


def test_full_dates_are_unchanged(client):
    card = _lung(client, crc(), resection(performed="2019-02-01"), lung_met(onset="2021-01-10"))
    assert _factor(card, "dfi_lt_24m")["status"] == "present"
    assert "recorded as" not in _factor(card, "dfi_lt_24m")["value"]


def test_synchronous_is_left_open_when_a_partial_diagnosis_date_straddles_six_months():
    facts = derive_facts(chart(crc(onset="2020"), lung_met(onset="2020-09-01")))
    a = assess_lung(facts)
    assert a is not None and a.timing is None
    exact = assess_lung(derive_facts(chart(crc(onset="2020-08-01"), lung_met(onset="2020-09-01"))))
    assert exact is not None and exact.timing == "synchronous"

"""Charts as EHRs really record them (clinical-logic §8.23–31): treatment on the liver side, repeat
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
    CPT,
    HEPATECTOMY_CPT,
    cea,
    chart,
    crc,
    liver_met,
    lung_met,
    medication_request,
    n_category,
    patient,
    procedure,
    resection,
)
from .conftest import SERVICE_URL, hook_body


def _bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    if not any(r["resourceType"] == "Patient" for r in resources):
        resources = (patient(), *resources)
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def _cards(client, *resources: dict[str, Any]) -> list[dict[str, Any]]:
    resp = client.post(SERVICE_URL, json=hook_body(_bundle(*resources), hook_instance="fixed"))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["cards"]


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

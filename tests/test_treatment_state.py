"""Where the patient is in treatment: systemic therapy, local therapy done or planned,
and the CEA rule of docs/clinical-rules.md §8.4 / §8.19, with the dates around each boundary."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.scoring.liver import assess_liver
from cds_service.clinical.scoring.lung import assess_lung

from .builders import (
    CPT,
    LOINC,
    PATIENT_ID,
    SNOMED,
    cea,
    chart,
    concept,
    crc,
    lung_met,
    n_category,
    procedure,
    resection,
)

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
OXALIPLATIN_IN, OXALIPLATIN_SCD, TOPICAL_5FU_SCD = "32592", "1736776", "105583"
LUNG = "39607008"

# A moderate-risk chart before any treatment: DFI 23 months, pN1 → score 2 of 4 once CEA is known.
BASE = (
    crc(onset="2019-01-10"),
    resection("2019-02-01"),
    n_category("pathologic", "1229951001"),
    lung_met(onset="2021-01-10"),
)


def med(
    rtype: str = "MedicationRequest",
    *,
    code: str | None = OXALIPLATIN_IN,
    text: str | None = None,
    status: str | None = None,
    date: str = "2021-02-01",
    medication_ref: str | None = None,
    bounds_start: str | None = None,
    id: str = "med",
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": rtype,
        "id": id,
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
    }
    if medication_ref:
        resource["medicationReference"] = {"reference": medication_ref}
    else:
        cc: dict[str, Any] = {"coding": [{"system": RXNORM, "code": code}]} if code else {}
        if text:
            cc["text"] = text
        resource["medicationCodeableConcept"] = cc
    if rtype == "MedicationRequest":
        resource.update(status=status or "active", intent="order", authoredOn=date)
        if bounds_start:
            resource["dosageInstruction"] = [
                {"timing": {"repeat": {"boundsPeriod": {"start": bounds_start}}}}
            ]
    elif rtype == "MedicationAdministration":
        resource.update(status=status or "completed", effectiveDateTime=date)
    else:
        resource.update(status=status or "active", effectiveDateTime=date)
    get_fhir_model_class(rtype).model_validate(resource)
    return resource


def lung(*resources):
    a = assess_lung(derive_facts(chart(*BASE, *resources)))
    assert a is not None
    return a


# --- systemic therapy ------------------------------------------------------------------------------


@pytest.mark.parametrize("rtype", ["MedicationRequest", "MedicationAdministration", "MedicationStatement"])
def test_systemic_therapy_after_the_lung_metastasis_means_nat_under_way(rtype):
    assert lung(cea(12, date="2021-01-20"), med(rtype)).recommendation == "assess-nat-response"


def test_adjuvant_chemotherapy_before_the_lung_metastasis_does_not_count():
    a = lung(cea(12, date="2021-01-20"), med(date="2019-03-01"))
    assert a.recommendation == "consider-nat"


def test_systemic_therapy_started_on_the_lung_metastasis_date_counts():
    assert lung(med(date="2021-01-10")).recommendation == "assess-nat-response"


@pytest.mark.parametrize(
    "coding,text,matched_by",
    [
        (OXALIPLATIN_SCD, None, "RxNorm code"),
        ("575971", None, "RxNorm code"),  # Synthea's Eloxatin component
        (None, "FOLFOX: Oxaliplatin 85 mg/m2 IV", "drug name"),
        (None, "5-fluorouracil 400 mg/m2 bolus", "drug name"),
    ],
)
def test_drug_matching_routes(coding, text, matched_by):
    facts = derive_facts(chart(*BASE, med(code=coding, text=text)))
    assert [t.matched_by for t in facts.systemic] == [matched_by]


@pytest.mark.parametrize(
    "text,drug",
    [
        ("mFOLFOX6 day 1", "mFOLFOX6"),  # a regimen, as oncologists write it
        ("folfiri", "FOLFIRI"),
        ("CAPOX cycle 1", "CAPOX"),
        ("5-FU 2400 mg/m2 over 46 h", "fluorouracil"),
        ("Avastin 5 mg/kg", "bevacizumab"),  # a brand name
        ("Xeloda 1000 mg/m2 bid", "capecitabine"),
    ],
)
def test_regimens_and_brand_names_in_an_orders_text_are_systemic_therapy(text, drug):
    facts = derive_facts(chart(*BASE, med(code=None, text=text)))
    assert [(t.drug, t.matched_by) for t in facts.systemic] == [(drug, "drug name")]


def test_a_regimen_order_keeps_the_on_treatment_cea_out():
    a = lung(cea(12, date="2021-01-20"), cea(3, date="2021-05-01"), med(code=None, text="mFOLFOX6"))
    assert a.recommendation == "assess-nat-response"
    assert next(f for f in a.factors if f.id == "cea_gt_5").status == "present"


@pytest.mark.parametrize(
    "coding,text",
    [
        (TOPICAL_5FU_SCD, None),
        (None, "fluorouracil 5% topical cream"),
        ("1719772", None),  # liposomal irinotecan
        (None, "ondansetron 8 mg"),
        (None, "trifluridine ophthalmic solution"),
    ],
)
def test_not_systemic_therapy_of_the_metastases(coding, text):
    assert derive_facts(chart(*BASE, med(code=coding, text=text))).systemic == []


@pytest.mark.parametrize(
    "rtype,status",
    [
        ("MedicationRequest", "cancelled"),
        ("MedicationRequest", "entered-in-error"),
        ("MedicationRequest", "draft"),
        ("MedicationAdministration", "not-done"),
        ("MedicationStatement", "not-taken"),
        ("MedicationStatement", "entered-in-error"),
    ],
)
def test_ignored_statuses(rtype, status):
    assert lung(cea(12, date="2021-01-20"), med(rtype, status=status)).recommendation == "consider-nat"


def test_an_order_left_active_for_years_counts_from_when_it_began():
    facts = derive_facts(chart(*BASE, med(date="2021-03-01", bounds_start="2021-02-15")))
    assert [t.start.isoformat() for t in facts.systemic] == ["2021-02-15"]


def test_medication_reference_with_ingredient_code():
    medication = {
        "resourceType": "Medication",
        "id": "folfox",
        "code": {"text": "FOLFOX regimen"},
        "ingredient": [{"itemCodeableConcept": concept(RXNORM, OXALIPLATIN_IN)}],
    }
    facts = derive_facts(chart(*BASE, medication, med(medication_ref="Medication/folfox")))
    assert [(t.drug, t.matched_by) for t in facts.systemic] == [("oxaliplatin", "Medication ingredient")]


def test_another_patients_medication_is_ignored():
    other = med()
    other["subject"] = {"reference": "Patient/other"}
    assert derive_facts(chart(*BASE, other)).systemic == []


# --- chemotherapy charted as a Procedure (docs/terminology.md §7, procedure-side evidence) ----------------


@pytest.mark.parametrize(
    "system,code",
    [
        (CPT, "96413"),  # infusion, first hour
        (CPT, "96409"),  # IV push (the eCQM oncology charts' only chemotherapy record)
        (CPT, "96416"),  # prolonged infusion with a pump: FOLFOX 5-FU
        (SNOMED, "461391000124102"),  # FOLFOX regimen
        (SNOMED, "870249004"),  # FOLFIRI
    ],
)
def test_chemotherapy_procedure_after_the_lung_metastasis_means_nat_under_way(system, code):
    a = lung(cea(14, date="2021-01-20"), procedure(system, code, performed="2021-02-01", id="chemo"))
    assert a.recommendation == "assess-nat-response"
    assert [(t.source, t.matched_by) for t in a.systemic] == [
        ("Procedure/chemo", "chemotherapy procedure code")
    ]


def test_on_treatment_cea_after_a_chemotherapy_procedure_is_not_used():
    chemo = procedure(CPT, "96413", performed="2021-02-01", id="chemo")
    a = lung(cea(14, date="2021-01-20", id="before"), cea(3.1, date="2021-05-01", id="after"), chemo)
    factor = next(f for f in a.factors if f.id == "cea_gt_5")
    assert factor.status == "present" and a.cea.result.source == "Observation/before"
    assert "start of systemic therapy on 2021-02-01" in a.cea.rule


@pytest.mark.parametrize("status", ["not-done", "entered-in-error", "preparation"])
def test_chemotherapy_procedure_not_given_does_not_count(status):
    chemo = procedure(CPT, "96413", status, performed="2021-02-01")
    assert lung(cea(12, date="2021-01-20"), chemo).recommendation == "consider-nat"


@pytest.mark.parametrize(
    "system,code",
    [
        (SNOMED, "703423002"),  # Synthea's combined chemotherapy and radiation therapy: not in the value set
        (CPT, "96523"),  # irrigation of an implanted venous access device
        (CPT, "51720"),  # bladder instillation
    ],
)
def test_procedures_that_are_not_systemic_therapy_of_the_metastases(system, code):
    facts = derive_facts(chart(*BASE, procedure(system, code, performed="2021-02-01")))
    assert facts.systemic == []


def test_adjuvant_chemotherapy_procedure_before_the_lung_metastasis_does_not_count():
    chemo = procedure(CPT, "96413", performed="2019-03-01")
    assert lung(cea(12, date="2021-01-20"), chemo).recommendation == "consider-nat"


# --- the CEA rule (§8.4) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cea_date,used",
    [
        ("2021-01-31", True),  # the day before chemotherapy starts
        ("2021-02-01", False),  # the day chemotherapy starts: not "before"
        ("2021-03-01", False),  # on treatment
    ],
)
def test_cea_must_predate_systemic_therapy(cea_date, used):
    a = lung(
        cea(3.0, date="2021-01-05", id="old"), cea(12, date=cea_date, id="boundary"), med(date="2021-02-01")
    )
    assert a.cea.result is not None
    assert (a.cea.result.source == "Observation/boundary") is used
    assert "start of systemic therapy" in a.cea.rule and "2021-02-01" in a.cea.rule


def test_on_treatment_cea_cannot_make_a_patient_look_low_risk():
    a = lung(cea(22.5, date="2021-01-20"), cea(3.4, date="2021-05-01"), med(date="2021-02-01"))
    assert next(f for f in a.factors if f.id == "cea_gt_5").status == "present"


def test_only_on_treatment_cea_leaves_the_factor_unknown():
    a = lung(cea(3.4, date="2021-05-01"), med(date="2021-02-01"))
    factor = next(f for f in a.factors if f.id == "cea_gt_5")
    assert factor.status == "unknown" and "(the later result may reflect treatment)" in factor.reason
    two = lung(
        cea(3.4, date="2021-05-01", id="c1"), cea(3.1, date="2021-06-01", id="c2"), med(date="2021-02-01")
    )
    reason = next(f for f in two.factors if f.id == "cea_gt_5").reason
    assert "(the 2 later results may reflect treatment)" in reason and "(s)" not in reason


def test_the_earlier_of_local_and_systemic_therapy_is_the_cutoff():
    wedge = procedure(SNOMED, "232632009", performed="2021-03-01", id="wedge")
    a = lung(
        cea(9, date="2021-01-25", id="before-chemo"),
        cea(20, date="2021-02-20", id="on-chemo"),
        med(date="2021-02-01"),
        wedge,
    )
    assert a.cea.result.source == "Observation/before-chemo"
    assert a.recommendation == "post-local-therapy-follow-up"


# --- local therapy done or planned -----------------------------------------------------------------


def test_the_chart_moves_from_diagnosis_to_nat_to_surgery():
    steps = [cea(12, date="2021-01-20")]
    assert lung(*steps).recommendation == "consider-nat"
    steps.append(med(date="2021-02-01"))
    assert lung(*steps).recommendation == "assess-nat-response"
    steps.append(procedure(SNOMED, "173172000", performed="2021-06-01", id="segmentectomy"))
    assert lung(*steps).recommendation == "post-local-therapy-follow-up"


def service_request(
    code_system: str, code: str, status: str = "active", body_site: str | None = LUNG
) -> dict:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": "sr",
        "status": status,
        "intent": "order",
        "code": concept(code_system, code),
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "authoredOn": "2021-02-10",
    }
    if body_site:
        resource["bodySite"] = [concept(SNOMED, body_site)]
    get_fhir_model_class("ServiceRequest").model_validate(resource)
    return resource


@pytest.mark.parametrize(
    "planned",
    [
        service_request(CPT, "32998"),  # RFA ordered
        service_request(CPT, "77373"),  # SBRT ordered, lung body site
        procedure(SNOMED, "426987001", "preparation", id="rfa"),  # ablation Procedure not yet done
    ],
)
def test_planned_ablation_or_sbrt_gives_ablation_guidance(planned):
    assert lung(cea(12, date="2021-01-20"), planned).recommendation == "ablation-guidance"


@pytest.mark.parametrize(
    "request_",
    [
        service_request(CPT, "32998", status="completed"),
        service_request(CPT, "32998", status="revoked"),
        service_request(CPT, "77373", body_site=None),  # SBRT with no sign it is for the lung
        service_request(LOINC, "2039-6"),  # a CEA order
    ],
)
def test_not_a_planned_lung_ablation(request_):
    assert lung(cea(12, date="2021-01-20"), request_).recommendation == "consider-nat"


def test_done_beats_planned_beats_systemic():
    done = procedure(SNOMED, "232632009", performed="2021-06-01", id="wedge")
    planned = service_request(CPT, "32998")
    assert lung(med(), planned, done).recommendation == "post-local-therapy-follow-up"
    assert lung(med(), planned).recommendation == "ablation-guidance"


# --- the liver mirror (§8.19) ----------------------------------------------------------------------


def test_liver_cea_is_the_last_before_liver_ablation():
    from .builders import condition

    liver = condition(SNOMED, "94381002", onset="2021-01-10", id="liver-met")
    ablation = procedure(SNOMED, "448781006", performed="2021-03-01", id="liver-rfa")
    facts = derive_facts(
        chart(
            crc(),
            resection(),
            liver,
            ablation,
            cea(250, date="2021-02-01", id="pre"),
            cea(20, date="2021-04-01", id="post"),
        )
    )
    a = assess_liver(facts, None)
    assert a is not None and a.cea.result.source == "Observation/pre"
    assert next(f for f in a.factors if f.id == "cea_gt_200").status == "present"


# --- therapies with no date (§8.4's safety rule still holds) ------------------------------------------


def _undated(resource: dict[str, Any]) -> dict[str, Any]:
    for key in ("authoredOn", "effectiveDateTime", "performedDateTime"):
        resource.pop(key, None)
    return resource


def _cea_factor(a):
    return next(f for f in a.factors if f.id == "cea_gt_5")


UNDATED_WEDGE = procedure(SNOMED, "232632009", id="wedge")


def test_an_undated_local_therapy_makes_the_detection_the_cea_cutoff():
    # The wedge could have been any day since the metastasis was found (2021-01-10): the low
    # result of May may be post-operative, the high one of January 5 cannot be.
    a = lung(cea(12, date="2021-01-05", id="before"), cea(2, date="2021-05-01", id="after"), UNDATED_WEDGE)
    assert a.cea.result is not None and a.cea.result.source == "Observation/before"
    assert _cea_factor(a).status == "present"
    assert "undated" in a.cea.rule and "2021-01-10" in a.cea.rule


def test_an_undated_local_therapy_with_only_later_cea_leaves_it_unknown():
    a = lung(cea(2, date="2021-05-01"), UNDATED_WEDGE)
    factor = _cea_factor(a)
    assert factor.status == "unknown" and "may reflect treatment" in factor.reason
    assert a.recommendation != "upfront-local-therapy"


def test_undated_systemic_therapy_cannot_let_an_on_treatment_cea_through():
    a = lung(cea(2, date="2021-05-01"), _undated(med()))
    assert _cea_factor(a).status == "unknown"
    assert "undated systemic therapy" in a.cea.rule


def test_undated_therapy_and_undated_metastasis_use_no_cea_and_print_no_placeholder_date():
    undated_met = lung_met(onset=None)
    a = assess_lung(derive_facts(chart(*BASE[:3], undated_met, cea(2, date="2021-05-01"), UNDATED_WEDGE)))
    assert a is not None
    factor = _cea_factor(a)
    assert factor.status == "unknown" and "0001" not in factor.reason + a.cea.rule


def test_a_statement_is_dated_by_its_effective_time_not_when_it_was_asserted():
    # Recorded before the metastasis (dateAsserted) but taken from February: therapy for it.
    statement = med("MedicationStatement", date="2021-02-01")
    statement["dateAsserted"] = "2020-12-15"
    a = lung(cea(12, date="2021-01-20"), cea(2, date="2021-05-01"), statement)
    assert a.recommendation == "assess-nat-response"
    assert "start of systemic therapy" in a.cea.rule and "2021-02-01" in a.cea.rule
    assert _cea_factor(a).status == "present"

"""Facts from FHIR (docs/clinical-rules.md §1-2, §8; terminology.md): scope, CEA, DFI and nodal status.

Each test pairs the rule with a chart where breaking the rule changes the answer, so removing the
rule makes the test fail.
"""

from __future__ import annotations

import datetime as dt

import pytest
from fhir.resources.R4B import get_fhir_model_class

from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.scoring.factors import (
    ABSENT,
    DAYS_PER_MONTH,
    PRESENT,
    UNKNOWN,
    months_text,
    pick_cea,
    threshold_status,
)
from cds_service.clinical.scoring.lung import assess_lung

from .builders import (
    AJCC,
    CDC_RACE,
    CPT,
    CRC_SNOMED,
    ICD10_WHO,
    ICD10CM,
    ICD10CM_OID,
    LOINC,
    LUNG_MET_SNOMED,
    PCS,
    POLYPECTOMY_SNOMED,
    SNOMED,
    WEDGE_SNOMED,
    cea,
    chart,
    condition,
    crc,
    lung_met,
    n_category,
    patient,
    procedure,
    resection,
    stage_group,
)

PN0, PN1C, PN2A, PNX = "1229947003", "1229956006", "1229959004", "1229945006"
CN1 = "1229973008"
STAGE_II, STAGE_IIB, STAGE_III, STAGE_IIIB, STAGE_IIIC = (
    "1222765007",
    "1222769001",
    "1222801008",
    "1222805004",
    "1222806003",
)


def facts_of(*resources):
    return derive_facts(chart(*resources))


def lung_factor(factor_id: str, *resources):
    assessment = assess_lung(facts_of(*resources))
    assert assessment is not None, "the chart has no lung metastasis"
    return next(f for f in assessment.factors if f.id == factor_id)


# --- the builders themselves ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "resource",
    [
        patient(),
        patient(deceased_boolean=True),
        patient(deceased_datetime="2023-04-01T10:00:00Z"),
        crc(stage_summary=STAGE_IIIC),
        crc(onset=None, recorded="2019-01"),
        lung_met(onset=None, onset_start="2021-03-01", body_site="39607008"),
        condition(SNOMED, LUNG_MET_SNOMED, verification="entered-in-error"),
        condition(ICD10CM, "C78.01", verification="refuted", subject="Patient/other"),
        resection(),
        procedure(CPT, "77373", performed=None, period_start="2021-05-01", reason="Condition/lung-met"),
        procedure(SNOMED, WEDGE_SNOMED, "not-done", body_site="39607008"),
        cea(7.5),
        cea(5, comparator="<", status="amended"),
        cea(None, value_string="see comment"),
        cea(3.0, unit=None),
        cea(12, "pmol/L", "19167-6"),
        n_category("pathologic", PN1C),
        n_category("clinical", "cN1a", focus=None),
        stage_group("pathologic", STAGE_III),
        stage_group("clinical", "IIB"),
    ],
    ids=lambda r: r["resourceType"],
)
def test_every_built_resource_is_valid_fhir_r4(resource):
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


# --- scope (§1, §8.20, terminology) --------------------------------------------------------------


def test_crc_with_lung_metastasis_is_in_scope():
    facts = facts_of(crc(), lung_met())
    assert facts.in_scope
    assert facts.primaries == ["Condition/crc"]
    assert [m.organ for m in facts.metastases] == ["lung"]


def test_crc_with_liver_metastasis_only_is_in_scope():
    assert facts_of(crc(), condition(SNOMED, "94381002")).in_scope


@pytest.mark.parametrize(
    "resources",
    [
        pytest.param([lung_met()], id="no-crc"),
        pytest.param([crc()], id="no-metastasis"),
        pytest.param([crc(), condition(SNOMED, "94627008")], id="peritoneum-only"),
        pytest.param([crc(), condition(SNOMED, "94222008")], id="bone-only"),
    ],
)
def test_out_of_scope_without_crc_or_lung_or_liver_metastasis(resources):
    assert not facts_of(*resources).in_scope


@pytest.mark.parametrize(
    "dead",
    [
        pytest.param(patient(deceased_boolean=True), id="deceasedBoolean"),
        pytest.param(patient(deceased_datetime="2023-01-02"), id="deceasedDateTime"),
    ],
)
def test_deceased_patient_is_out_of_scope(dead):
    facts = facts_of(dead, crc(), lung_met())
    assert facts.deceased and not facts.in_scope


def test_patient_alive_when_deceased_boolean_false():
    assert facts_of(patient(deceased_boolean=False), crc(), lung_met()).in_scope


@pytest.mark.parametrize("verification", ["entered-in-error", "refuted"])
@pytest.mark.parametrize("which", ["crc", "metastasis"])
def test_excluded_verification_status_takes_condition_out(which, verification):
    primary = crc(verification=verification) if which == "crc" else crc()
    met = lung_met(verification=verification) if which == "metastasis" else lung_met()
    assert not facts_of(primary, met).in_scope


@pytest.mark.parametrize("verification", ["confirmed", "provisional", "unconfirmed", None])
def test_other_verification_statuses_keep_the_condition(verification):
    assert facts_of(crc(verification=verification), lung_met(verification=verification)).in_scope


@pytest.mark.parametrize("code", ["C18.1", "C181"])
def test_appendix_is_not_colorectal(code):
    assert not facts_of(condition(ICD10CM, code), lung_met()).in_scope


@pytest.mark.parametrize(
    "system,code",
    [
        (ICD10CM, "C18.7"),
        (ICD10CM, "C187"),
        (ICD10CM, "C20"),
        (ICD10CM, "C19"),
        (ICD10CM_OID, "C18.2"),
        (ICD10_WHO, "C18.7"),
        (ICD10_WHO, "C20"),
    ],
)
def test_icd10_primary_with_or_without_dot(system, code):
    assert facts_of(condition(system, code), lung_met()).in_scope


@pytest.mark.parametrize(
    "system,code",
    [
        (ICD10CM, "C78.01"),
        (ICD10CM, "C7801"),
        (ICD10CM, "C78.00"),
        (ICD10_WHO, "C78.0"),
        (ICD10CM_OID, "C78.02"),
    ],
)
def test_icd10_lung_metastasis_with_or_without_dot(system, code):
    facts = facts_of(crc(), condition(system, code))
    assert facts.in_scope
    assert [m.organ for m in facts.metastases] == ["lung"]


@pytest.mark.parametrize(
    "primary,met",
    [
        pytest.param((LOINC, CRC_SNOMED), (SNOMED, LUNG_MET_SNOMED), id="crc-snomed-code-under-loinc"),
        pytest.param((ICD10CM, CRC_SNOMED), (SNOMED, LUNG_MET_SNOMED), id="crc-snomed-code-under-icd10"),
        pytest.param((SNOMED, CRC_SNOMED), (LOINC, LUNG_MET_SNOMED), id="met-snomed-code-under-loinc"),
        pytest.param((SNOMED, CRC_SNOMED), (CPT, "C78.01"), id="met-icd10-code-under-cpt"),
        pytest.param((SNOMED, "C18.7"), (SNOMED, LUNG_MET_SNOMED), id="crc-icd10-code-under-snomed"),
    ],
)
def test_codes_match_on_system_and_code(primary, met):
    assert not facts_of(condition(*primary), condition(*met)).in_scope


@pytest.mark.parametrize("system,code", [(SNOMED, "94260004"), (SNOMED, "781076008"), (ICD10CM, "C78.5")])
def test_secondary_of_colon_is_the_crc_itself_never_a_site(system, code):
    stage_iv = condition(system, code, id="crc-iv")
    with_lung = facts_of(stage_iv, lung_met())
    assert with_lung.in_scope
    assert with_lung.primaries == ["Condition/crc-iv"]
    assert [m.organ for m in with_lung.metastases] == ["lung"]
    assert lung_factor("extrapulmonary_metastases", stage_iv, lung_met()).status == ABSENT
    alone = facts_of(stage_iv)
    assert alone.has_crc and not alone.in_scope and alone.metastases == []


def test_cea_code_under_cdc_race_system_is_not_cea():
    facts = facts_of(crc(), lung_met(), cea(12.0, system=CDC_RACE))
    assert facts.cea == []
    assert lung_factor("cea_gt_5", crc(), lung_met(), cea(12.0, system=CDC_RACE)).status == UNKNOWN


# --- another patient's data (§8.17) --------------------------------------------------------------


def test_another_patients_metastasis_does_not_bring_the_chart_into_scope():
    assert not facts_of(crc(), lung_met(subject="Patient/other")).in_scope
    assert not facts_of(crc(subject="Patient/other"), lung_met()).in_scope


def test_another_patients_cea_resection_and_staging_are_never_used():
    own = [crc(), lung_met(onset="2021-01-10")]
    foreign = [
        cea(50.0, date="2021-01-01", subject="Patient/other"),
        resection("2020-06-01", id="other-resection", subject="Patient/other"),
        n_category("pathologic", PN2A, subject="Patient/other"),
    ]
    facts = facts_of(*own, *foreign)
    assert facts.cea == [] and facts.resections == [] and facts.nodal == []
    for factor_id in ("cea_gt_5", "dfi_lt_24m", "node_positive_primary"):
        assert lung_factor(factor_id, *own, *foreign).status == UNKNOWN


def test_another_patients_deceased_patient_resource_is_ignored():
    facts = facts_of(patient("other", deceased_boolean=True), crc(), lung_met())
    assert not facts.deceased and facts.in_scope


# --- CEA: units (§2, terminology §1) --------------------------------------------------------------


@pytest.mark.parametrize(
    "value,unit,ng_ml",
    [
        (7.0, "ng/mL", 7.0),
        (7.0, "ug/L", 7.0),
        (700.0, "ng/dL", 7.0),
        (7000.0, "ng/L", 7.0),
        (0.007, "ug/mL", 7.0),
        (300.0, "ng/dL", 3.0),
        (0.003, "ug/mL", 3.0),
    ],
)
def test_cea_unit_is_normalised_to_ng_per_ml(value, unit, ng_ml):
    resources = [crc(), lung_met(), cea(value, unit)]
    (result,) = facts_of(*resources).cea
    assert result.ng_ml == pytest.approx(ng_ml)
    factor = lung_factor("cea_gt_5", *resources)
    assert factor.status == (PRESENT if ng_ml > 5 else ABSENT)


@pytest.mark.parametrize(
    "code,unit",
    [("19167-6", "pmol/L"), ("19166-8", "U/mL")],
)
def test_cea_in_molar_or_arbitrary_units_is_unknown_with_reason(code, unit):
    factor = lung_factor("cea_gt_5", crc(), lung_met(), cea(40.0, unit, code, id="cea-x"))
    assert factor.status == UNKNOWN
    assert unit in factor.reason
    assert factor.sources == ("Observation/cea-x",)


def test_cea_immunoassay_code_is_cea():
    assert lung_factor("cea_gt_5", crc(), lung_met(), cea(7.0, code="83085-1")).status == PRESENT


@pytest.mark.parametrize("code", ["12515-3", "19169-2", "40622-3", "2037-0"])
def test_non_serum_cea_codes_are_ignored(code):
    assert facts_of(crc(), lung_met(), cea(7.0, code=code)).cea == []


def test_cea_molar_code_is_not_converted_even_in_a_mass_unit():
    factor = lung_factor("cea_gt_5", crc(), lung_met(), cea(40.0, "ng/mL", "19167-6"))
    assert factor.status == UNKNOWN


@pytest.mark.parametrize("unit", ["mmol/L", "[arb'U]/mL", None])
def test_cea_with_unknown_or_missing_unit_is_unknown_not_guessed(unit):
    factor = lung_factor("cea_gt_5", crc(), lung_met(), cea(40.0, unit))
    assert factor.status == UNKNOWN
    assert factor.reason


def test_cea_text_result_is_unknown():
    factor = lung_factor("cea_gt_5", crc(), lung_met(), cea(None, value_string="> 5"))
    assert factor.status == UNKNOWN and factor.reason


# --- CEA: comparators (§8.12) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "comparator,value,status",
    [
        ("<", 5.0, ABSENT),
        ("<=", 5.0, ABSENT),
        (">", 5.0, PRESENT),
        (">=", 6.0, PRESENT),
        ("<", 10.0, UNKNOWN),
        ("<=", 5.5, UNKNOWN),
        (">", 3.0, UNKNOWN),
        (">=", 5.0, UNKNOWN),
        (None, 5.0, ABSENT),
        (None, 5.1, PRESENT),
    ],
)
def test_threshold_status_honours_comparators(comparator, value, status):
    assert threshold_status(value, comparator, 5.0) == status


@pytest.mark.parametrize(
    "comparator,value,status",
    [
        ("<", 5.0, ABSENT),
        (">", 5.0, PRESENT),
        ("<", 10.0, UNKNOWN),
        (">", 3.0, UNKNOWN),
        (">=", 5.0, UNKNOWN),
        (None, 5.0, ABSENT),
    ],
)
def test_cea_factor_honours_comparators(comparator, value, status):
    factor = lung_factor("cea_gt_5", crc(), lung_met(), cea(value, comparator=comparator))
    assert factor.status == status
    if status == UNKNOWN:
        assert "5" in factor.reason


def test_cea_comparator_applies_after_unit_conversion():
    factor = lung_factor("cea_gt_5", crc(), lung_met(), cea(500.0, "ng/dL", comparator="<"))
    assert factor.status == ABSENT


# --- CEA: status filters and which result (§2, §8.4, §8.13) ----------------------------------------


@pytest.mark.parametrize("status", ["preliminary", "entered-in-error", "cancelled", "registered"])
def test_cea_with_unusable_status_is_ignored(status):
    factor = lung_factor(
        "cea_gt_5",
        crc(),
        lung_met(),
        cea(3.0, date="2021-01-01"),
        cea(12.0, date="2021-02-01", status=status),
    )
    assert factor.status == ABSENT
    assert factor.date == dt.date(2021, 1, 1)


@pytest.mark.parametrize("status", ["final", "amended", "corrected"])
def test_cea_final_amended_corrected_are_used(status):
    factor = lung_factor(
        "cea_gt_5",
        crc(),
        lung_met(),
        cea(3.0, date="2021-01-01"),
        cea(12.0, date="2021-02-01", status=status),
    )
    assert factor.status == PRESENT
    assert factor.date == dt.date(2021, 2, 1)


@pytest.mark.parametrize(
    "older,newer,status",
    [(12.0, 3.0, ABSENT), (3.0, 12.0, PRESENT)],
)
def test_latest_cea_is_picked(older, newer, status):
    resources = [
        crc(),
        lung_met(),
        cea(newer, date="2021-03-01", id="cea-new"),
        cea(older, date="2020-11-01", id="cea-old"),
    ]
    factor = lung_factor("cea_gt_5", *resources)
    assert factor.status == status
    assert factor.sources == ("Observation/cea-new",)


@pytest.mark.parametrize(
    "unreadable",
    [
        pytest.param(cea(40.0, "pmol/L", "19167-6", date="2021-03-01", id="cea-bad"), id="pmol"),
        pytest.param(cea(40.0, "U/mL", "19166-8", date="2021-03-01", id="cea-bad"), id="units"),
        pytest.param(cea(40.0, "mmol/L", date="2021-03-01", id="cea-bad"), id="unknown-unit"),
        pytest.param(cea(None, value_string="pending", date="2021-03-01", id="cea-bad"), id="text"),
    ],
)
def test_newer_unreadable_cea_is_named_as_not_used(unreadable):
    resources = [crc(), lung_met(), cea(3.0, date="2021-01-01", id="cea-ok"), unreadable]
    assessment = assess_lung(facts_of(*resources))
    factor = assessment.factors[0]
    assert factor.status == ABSENT and factor.sources == ("Observation/cea-ok",)
    assert [r.source for r in assessment.cea.not_used] == ["Observation/cea-bad"]
    assert assessment.cea.not_used[0].unreadable


def test_older_unreadable_cea_is_not_named():
    resources = [
        crc(),
        lung_met(),
        cea(40.0, "pmol/L", "19167-6", date="2020-01-01"),
        cea(3.0, date="2021-01-01"),
    ]
    assert assess_lung(facts_of(*resources)).cea.not_used == []


def _wedge(date: str):
    return procedure(SNOMED, WEDGE_SNOMED, performed=date, id="wedge")


def test_cea_before_first_lung_local_therapy_is_picked():
    resources = [
        crc(),
        lung_met(onset="2021-01-10"),
        cea(12.0, date="2021-02-01", id="cea-pre"),
        _wedge("2021-03-01"),
        cea(2.0, date="2021-04-01", id="cea-post"),
    ]
    assessment = assess_lung(facts_of(*resources))
    factor = assessment.factors[0]
    assert factor.status == PRESENT and factor.sources == ("Observation/cea-pre",)
    assert "2021-03-01" in assessment.cea.rule
    assert not assessment.cea.picked_latest


def test_cea_on_the_day_of_lung_local_therapy_is_not_before_it():
    resources = [
        crc(),
        lung_met(onset="2021-01-10"),
        cea(2.0, date="2021-02-01", id="cea-pre"),
        cea(12.0, date="2021-03-01", id="cea-same-day"),
        _wedge("2021-03-01"),
    ]
    factor = lung_factor("cea_gt_5", *resources)
    assert factor.status == ABSENT and factor.sources == ("Observation/cea-pre",)


def test_only_post_therapy_cea_is_unknown_with_reason():
    resources = [crc(), lung_met(onset="2021-01-10"), _wedge("2021-03-01"), cea(12.0, date="2021-04-01")]
    factor = lung_factor("cea_gt_5", *resources)
    assert factor.status == UNKNOWN
    assert "2021-03-01" in factor.reason


def test_not_done_wedge_does_not_move_the_cea_cutoff():
    wedge = procedure(SNOMED, WEDGE_SNOMED, "not-done", performed="2021-03-01")
    resources = [crc(), lung_met(onset="2021-01-10"), wedge, cea(12.0, date="2021-04-01")]
    assert lung_factor("cea_gt_5", *resources).status == PRESENT


def test_no_cea_is_unknown_with_reason():
    factor = lung_factor("cea_gt_5", crc(), lung_met())
    assert factor.status == UNKNOWN and "CEA" in factor.reason


def test_same_day_cea_tie_goes_to_the_higher_value():
    resources = [
        crc(),
        lung_met(),
        cea(3.0, date="2021-01-05", id="low"),
        cea(12.0, date="2021-01-05", id="high"),
    ]
    factor = lung_factor("cea_gt_5", *resources)
    assert factor.status == PRESENT and factor.sources == ("Observation/high",)


def test_pick_cea_directly():
    facts = facts_of(
        crc(),
        lung_met(),
        cea(4.0, date="2021-01-01", id="a"),
        cea(9.0, date="2021-02-01", id="b"),
        cea(1.0, date="2021-03-01", id="c"),
    )
    assert pick_cea(facts.cea, None, "x").result.source == "Observation/c"
    assert pick_cea(facts.cea, dt.date(2021, 3, 1), "x").result.source == "Observation/b"
    assert pick_cea(facts.cea, dt.date(2021, 2, 1), "x").result.source == "Observation/a"
    none = pick_cea(facts.cea, dt.date(2021, 1, 1), "x")
    assert none.result is None and none.reason


# --- DFI (§2, §8.2) --------------------------------------------------------------------------------


def dfi(*resources):
    return lung_factor("dfi_lt_24m", crc(), *resources)


@pytest.mark.parametrize(
    "detected,status",
    [
        ("2020-06-01", PRESENT),  # 16 months
        ("2021-01-15", PRESENT),  # 23.5 months
        ("2021-03-01", ABSENT),  # 25 months
        ("2022-01-01", ABSENT),  # 35 months
    ],
)
def test_dfi_below_24_months_is_the_factor(detected, status):
    factor = dfi(resection("2019-02-01"), lung_met(onset=detected))
    assert factor.status == status
    assert factor.date == dt.date.fromisoformat(detected)
    assert set(factor.sources) == {"Procedure/resection", "Condition/lung-met"}


@pytest.mark.parametrize("detected", ["2019-01-15", "2019-02-01"])
def test_lung_metastasis_found_on_or_before_resection_is_dfi_zero(detected):
    factor = dfi(resection("2019-02-01"), lung_met(onset=detected))
    assert factor.status == PRESENT
    assert factor.value.startswith("0 months")


def test_earliest_completed_resection_is_used():
    first = resection("2019-02-01", id="first")
    second = procedure(SNOMED, "265414003", performed="2021-06-01", id="apr")  # APR, later
    factor = dfi(second, first, lung_met(onset="2021-09-01"))
    assert factor.status == ABSENT  # 31 months from the first; 3 from the second
    assert "Procedure/first" in factor.sources


@pytest.mark.parametrize("status", ["not-done", "entered-in-error", "in-progress", "preparation"])
def test_resection_that_is_not_completed_is_ignored(status):
    bad = resection("2019-02-01", status=status, id="bad")
    good = resection("2021-01-01", id="good")
    factor = dfi(bad, good, lung_met(onset="2021-06-01"))
    assert factor.status == PRESENT  # 5 months from the completed one; 28 from the other
    assert "Procedure/bad" not in factor.sources


def test_not_done_resection_alone_leaves_dfi_unknown():
    assert dfi(resection("2019-02-01", status="not-done"), lung_met()).status == UNKNOWN


def test_only_polypectomy_is_unknown_with_reason():
    polyp = procedure(SNOMED, POLYPECTOMY_SNOMED, performed="2019-02-01", id="polyp")
    factor = dfi(polyp, lung_met(onset="2019-06-01"))
    assert factor.status == UNKNOWN
    assert "polypectomy" in factor.reason
    assert factor.sources == ("Procedure/polyp",)


def test_no_resection_is_unknown_with_reason():
    factor = dfi(lung_met())
    assert factor.status == UNKNOWN and "no primary tumour resection" in factor.reason


def test_resection_performed_period_start_is_its_date():
    factor = dfi(resection(None, period_start="2019-02-01"), lung_met(onset="2020-06-01"))
    assert factor.status == PRESENT and "2019-02-01" in factor.value


def test_metastasis_onset_period_start_is_its_detection():
    factor = dfi(resection("2019-02-01"), lung_met(onset=None, onset_start="2022-01-01"))
    assert factor.status == ABSENT and factor.date == dt.date(2022, 1, 1)


def test_metastasis_recorded_date_is_the_fallback():
    factor = dfi(resection("2019-02-01"), lung_met(onset=None, recorded="2020-06-01"))
    assert factor.status == PRESENT and factor.date == dt.date(2020, 6, 1)


def test_metastasis_onset_wins_over_recorded_date():
    factor = dfi(resection("2019-02-01"), lung_met(onset="2020-06-01", recorded="2022-01-01"))
    assert factor.status == PRESENT and factor.date == dt.date(2020, 6, 1)


def test_undated_metastasis_leaves_dfi_unknown():
    factor = dfi(resection("2019-02-01"), lung_met(onset=None))
    assert factor.status == UNKNOWN and factor.reason


def test_earliest_lung_metastasis_dates_the_dfi():
    later = condition(SNOMED, "353561000119103", onset="2022-01-01", id="right-lung")
    factor = dfi(resection("2019-02-01"), later, lung_met(onset="2020-06-01"))
    assert factor.status == PRESENT and factor.date == dt.date(2020, 6, 1)


@pytest.mark.parametrize(
    "performed,detected,status",
    [
        ("2019-02", "2020-06", PRESENT),
        ("2019", "2022", ABSENT),
        ("2019-02", "2020-06-15T10:00:00+02:00", PRESENT),
    ],
)
def test_partial_dates_are_read(performed, detected, status):
    assert dfi(resection(performed), lung_met(onset=detected)).status == status


@pytest.mark.parametrize(
    "system,code",
    [
        (SNOMED, "23968004"),  # colectomy
        (SNOMED, "84604002"),  # sigmoid colectomy
        (CPT, "44140"),  # partial colectomy with anastomosis
        (CPT, "45110"),  # APR
        (PCS, "0DTN0ZZ"),  # resection of sigmoid colon, open
        (PCS, "0DTP4ZZ"),  # resection of rectum, laparoscopic
    ],
)
def test_resection_codes_in_each_system(system, code):
    factor = dfi(procedure(system, code, performed="2019-02-01"), lung_met(onset="2022-01-01"))
    assert factor.status == ABSENT


@pytest.mark.parametrize(
    "system,code",
    [
        (PCS, "0DBP8ZZ"),  # transanal endoscopic excision of rectum: local excision
        (CPT, "44213"),  # splenic-flexure mobilisation add-on
        (CPT, "45121"),  # Hirschsprung proctectomy
        (CPT, "23968004"),  # a SNOMED code under CPT
        (SNOMED, "44140"),  # a CPT code under SNOMED
    ],
)
def test_codes_that_are_not_a_primary_resection(system, code):
    factor = dfi(procedure(system, code, performed="2019-02-01"), lung_met(onset="2022-01-01"))
    assert factor.status == UNKNOWN


def test_transanal_excision_is_named_as_local_excision():
    factor = dfi(procedure(PCS, "0DBP8ZZ", performed="2019-02-01"), lung_met(onset="2022-01-01"))
    assert "excision" in factor.reason


# --- nodal status (§2, §8.5, §8.14) -----------------------------------------------------------------


def nodal(*resources):
    return lung_factor("node_positive_primary", crc(), lung_met(), *resources)


@pytest.mark.parametrize(
    "resources,status",
    [
        pytest.param([n_category("pathologic", PN1C)], PRESENT, id="pN1c"),
        pytest.param([n_category("pathologic", PN2A)], PRESENT, id="pN2a"),
        pytest.param([n_category("pathologic", PN0)], ABSENT, id="pN0"),
        pytest.param([n_category("clinical", "1229977009")], PRESENT, id="cN1c"),
        pytest.param([n_category("clinical", "1229967007")], ABSENT, id="cN0"),
        pytest.param(
            [n_category("pathologic", PN0, "2019-03-01"), n_category("clinical", CN1, "2019-01-15")],
            ABSENT,
            id="pN0-over-cN1",
        ),
        pytest.param(
            [n_category("pathologic", PN0, "2019-01-15"), n_category("clinical", CN1, "2019-03-01")],
            ABSENT,
            id="pN0-over-later-cN1",
        ),
        pytest.param(
            [n_category("pathologic", PNX), n_category("clinical", CN1)], PRESENT, id="pNX-then-cN1"
        ),
        pytest.param([n_category("clinical", "cN1a")], PRESENT, id="ajcc-cN1a"),
        pytest.param([n_category("pathologic", "pN0")], ABSENT, id="ajcc-pN0"),
        pytest.param([n_category("unspecified", "pN2b")], PRESENT, id="ajcc-pN2b-unspecified-code"),
        pytest.param(
            [n_category("pathologic", "pN0"), n_category("clinical", "cN2")], ABSENT, id="ajcc-pN0-over-cN2"
        ),
        pytest.param(
            [n_category("unspecified", "pN0"), n_category("clinical", CN1)],
            ABSENT,
            id="ajcc-prefix-says-pathologic",
        ),
        pytest.param(
            [n_category("unspecified", PN0), n_category("clinical", CN1)],
            ABSENT,
            id="snomed-value-says-pathologic",
        ),
        pytest.param([stage_group("pathologic", STAGE_III)], PRESENT, id="stage-III-observation"),
        pytest.param([stage_group("clinical", STAGE_IIIB)], PRESENT, id="clinical-stage-IIIB"),
        pytest.param([stage_group("unspecified", "IIIA")], PRESENT, id="ajcc-stage-IIIA"),
        pytest.param([stage_group("pathologic", STAGE_II)], ABSENT, id="pathologic-stage-II"),
        # §8.5: stage I/II is negative only "with no N category"; a recorded N category decides.
        pytest.param(
            [stage_group("pathologic", STAGE_II), n_category("clinical", CN1)],
            PRESENT,
            id="pathologic-stage-II-with-cN1",
        ),
        pytest.param(
            [stage_group("pathologic", STAGE_II), n_category("clinical", "1229967007")],
            ABSENT,
            id="pathologic-stage-II-with-cN0",
        ),
        pytest.param(
            [stage_group("pathologic", STAGE_II), n_category("unspecified", "N1")],
            PRESENT,
            id="pathologic-stage-II-with-unspecified-N1",
        ),
        pytest.param(
            [n_category("pathologic", PNX), stage_group("pathologic", STAGE_II)],
            UNKNOWN,
            id="pNX-makes-pathologic-stage-II-uninformative",
        ),
        pytest.param(
            [n_category("pathologic", PNX), stage_group("pathologic", STAGE_II), n_category("clinical", CN1)],
            PRESENT,
            id="pNX-and-pathologic-stage-II-then-cN1",
        ),
    ],
)
def test_nodal_status(resources, status):
    assert nodal(*resources).status == status


@pytest.mark.parametrize(
    "resources,shown",
    [
        pytest.param([n_category("pathologic", "1229960009")], "pN2b", id="coded-pN2b"),
        pytest.param([n_category("pathologic", PN2A)], "pN2a", id="coded-pN2a"),
        pytest.param([n_category("clinical", "1229977009")], "cN1c", id="coded-cN1c"),
        pytest.param([n_category("unspecified", "pN2b")], "pN2b", id="ajcc-pN2b"),
        pytest.param([n_category("pathologic", "N1a")], "pN1a", id="ajcc-N1a-under-a-pN-code"),
        pytest.param([stage_group("unspecified", STAGE_IIIB)], "stage IIIB (AJCC)", id="stage-IIIB"),
        pytest.param([stage_group("pathologic", STAGE_IIIC)], "pathologic stage IIIC (AJCC)", id="p-IIIC"),
        pytest.param([stage_group("unspecified", "IIIA")], "stage IIIA", id="ajcc-text-IIIA"),
    ],
)
def test_the_card_shows_the_nodal_category_or_stage_as_charted(resources, shown):
    """pN2b stays pN2b (node-positive all the same); a stage reads "stage IIIB (AJCC)", never a SNOMED
    fully specified name inside a sentence of our own."""
    factor = nodal(*resources)
    assert factor.status == PRESENT and factor.value == shown


def test_condition_stage_summary_is_shown_as_a_clean_stage():
    factor = lung_factor("node_positive_primary", crc(stage_summary=STAGE_IIIB), lung_met())
    assert factor.value == "stage IIIB (AJCC)"


def test_pnx_alone_is_unknown_with_reason():
    factor = nodal(n_category("pathologic", PNX, id="pnx"))
    assert factor.status == UNKNOWN
    assert "NX" in factor.reason and factor.sources == ("Observation/pnx",)


def test_clinical_stage_ii_without_n_is_unknown():
    factor = nodal(stage_group("clinical", STAGE_IIB))
    assert factor.status == UNKNOWN and factor.reason


def test_no_nodal_data_is_unknown_with_reason():
    factor = nodal()
    assert factor.status == UNKNOWN and "no N category or stage group" in factor.reason


def test_condition_stage_summary_iii_is_node_positive():
    factor = lung_factor("node_positive_primary", crc(stage_summary=STAGE_IIIC), lung_met())
    assert factor.status == PRESENT and factor.sources == ("Condition/crc",)


def test_stage_summary_of_an_excluded_crc_condition_is_not_read():
    entered = crc(stage_summary=STAGE_IIIC, verification="entered-in-error", id="old")
    factor = lung_factor("node_positive_primary", crc(), entered, lung_met())
    assert factor.status == UNKNOWN


def test_staging_focused_on_another_cancer_is_ignored():
    lung_primary = condition(SNOMED, "93880001", id="lung-primary")  # primary malignant neoplasm of lung
    other = n_category("pathologic", PN2A, focus="Condition/lung-primary")
    assert nodal(lung_primary, other).status == UNKNOWN
    own = n_category("pathologic", PN2A, focus="Condition/crc")
    assert nodal(lung_primary, own).status == PRESENT


def _member_of(group: dict, *members: dict) -> dict:
    group["hasMember"] = [{"reference": f"Observation/{m['id']}"} for m in members]
    return group


def test_an_mcode_n_category_takes_the_focus_of_its_stage_group():
    # mCODE: the TNM categories name no focus; their stage group names the cancer staged.
    breast = condition(SNOMED, "254837009", id="breast-primary")  # malignant neoplasm of breast
    pn0 = n_category("pathologic", PN0, focus=None, id="breast-pn")
    group = _member_of(stage_group("pathologic", STAGE_II, focus="Condition/breast-primary", id="bg"), pn0)
    assert nodal(breast, pn0, group).status == UNKNOWN
    pn1 = n_category("pathologic", PN2A, focus=None, id="crc-pn")
    own_group = _member_of(stage_group("pathologic", STAGE_III, focus="Condition/crc", id="cg"), pn1)
    factor = nodal(breast, pn1, own_group)
    assert factor.status == PRESENT and factor.sources in (("Observation/crc-pn",), ("Observation/cg",))


@pytest.mark.parametrize(
    "date,status",
    [
        ("2016-03-16", UNKNOWN),  # years before the colorectal cancer (2019-01-10): another cancer's
        ("2018-12-01", ABSENT),  # a few weeks before: its own staging
    ],
)
def test_staging_tied_to_no_cancer_and_long_before_the_diagnosis_is_not_the_colorectal_cancers(date, status):
    assert nodal(n_category("clinical", "1229967007", date, focus=None)).status == status


def test_a_primary_known_only_by_its_recorded_date_keeps_earlier_staging():
    # Recorded in 2021, diagnosed who knows when: its 2019 staging may well be its own.
    recorded_only = crc(onset=None, recorded="2021-06-01")
    factor = lung_factor(
        "node_positive_primary", recorded_only, lung_met(), n_category("pathologic", PN2A, focus=None)
    )
    assert factor.status == PRESENT


@pytest.mark.parametrize("status", ["preliminary", "entered-in-error", "cancelled"])
def test_staging_with_unusable_status_is_ignored(status):
    assert nodal(n_category("pathologic", PN1C, status=status)).status == UNKNOWN


@pytest.mark.parametrize("status", ["amended", "corrected"])
def test_staging_amended_or_corrected_is_used(status):
    assert nodal(n_category("pathologic", PN1C, status=status)).status == PRESENT


def test_ajcc_string_under_a_non_ajcc_system_is_not_read():
    observation = n_category("pathologic", PN0)
    observation["valueCodeableConcept"] = {"coding": [{"system": SNOMED, "code": "pN1"}]}
    assert nodal(observation).status == UNKNOWN
    observation["valueCodeableConcept"] = {"coding": [{"system": AJCC, "code": "pN1"}]}
    assert nodal(observation).status == PRESENT


@pytest.mark.parametrize(
    "days,text",
    [
        (730, "23.9 months"),
        (731, "24.0 months"),
        (365, "11.9 months"),
        (434, "14.2 months"),
        (0, "0.0 months"),
    ],
)
def test_months_are_shown_rounded_down_so_a_value_under_a_limit_never_reads_as_the_limit(days, text):
    assert months_text(days / DAYS_PER_MONTH) == text

"""The four-factor lung model and the lung pathway (docs/clinical-rules.md §3-4, §8; docs/service-contract.md).

Extrapulmonary metastases by organ, the score range with unknowns, the groups, and every lung
recommendation row, built from small FHIR charts.
"""

from __future__ import annotations

import pytest

from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.knowledge.thresholds import group_of, lung_params
from cds_service.clinical.scoring.factors import ABSENT, PRESENT, UNKNOWN
from cds_service.clinical.scoring.lung import assess_lung, extrapulmonary_factor, recommend

from .builders import (
    BONE_MET_SNOMED,
    BRAIN_MET_SNOMED,
    CPT,
    GENERIC_MET_SNOMED,
    ICD10CM,
    LIVER_BODY_SITE,
    LIVER_MET_SNOMED,
    LUNG_BODY_SITE,
    LYMPHANGITIC_SNOMED,
    PCS,
    SNOMED,
    WEDGE_SNOMED,
    cea,
    chart,
    concept,
    condition,
    crc,
    lung_met,
    n_category,
    procedure,
    resection,
)

PN0, PN1 = "1229947003", "1229951001"


def low_risk(*extra, without: tuple[str, ...] = ()) -> list[dict]:
    """A chart where all four factors are absent; `extra` adds resources, `without` drops parts."""
    parts = {
        "crc": crc(onset="2019-01-10"),
        "lung": lung_met(onset="2022-06-01"),
        "resection": resection("2019-02-01"),  # DFI 40 months
        "cea": cea(3.0, date="2022-05-20", id="cea-low"),
        "nodal": n_category("pathologic", PN0),
    }
    return [r for name, r in parts.items() if name not in without] + list(extra)


def assess(*resources):
    assessment = assess_lung(derive_facts(chart(*resources)))
    assert assessment is not None
    return assessment


def statuses(assessment) -> dict[str, str]:
    return {f.id: f.status for f in assessment.factors}


def test_low_risk_baseline_has_every_factor_absent():
    assessment = assess(*low_risk())
    assert statuses(assessment) == {
        "cea_gt_5": ABSENT,
        "dfi_lt_24m": ABSENT,
        "node_positive_primary": ABSENT,
        "extrapulmonary_metastases": ABSENT,
    }
    assert [f.id for f in assessment.factors] == [
        "cea_gt_5",
        "dfi_lt_24m",
        "node_positive_primary",
        "extrapulmonary_metastases",
    ]


def test_no_lung_metastasis_means_no_lung_assessment():
    facts = derive_facts(chart(crc(), condition(SNOMED, LIVER_MET_SNOMED)))
    assert facts.in_scope and assess_lung(facts) is None


# --- extrapulmonary metastases (§2, §8.6, §8.15; terminology decisions) ------------------------------


@pytest.mark.parametrize(
    "system,code,organ",
    [
        (SNOMED, BONE_MET_SNOMED, "bone"),
        (ICD10CM, "C79.51", "bone"),
        (SNOMED, LIVER_MET_SNOMED, "liver"),
        (ICD10CM, "C787", "liver"),
        (SNOMED, BRAIN_MET_SNOMED, "brain"),
        (ICD10CM, "C79.31", "brain"),
        (SNOMED, "94161006", "adrenal"),
        (SNOMED, "94627008", "peritoneum"),
        (ICD10CM, "C77.2", "distant_lymph_nodes"),
    ],
)
def test_extrapulmonary_site_is_present(system, code, organ):
    assessment = assess(*low_risk(condition(system, code, onset="2022-05-01", id="extra")))
    factor = assessment.factors[3]
    assert factor.status == PRESENT
    assert factor.sources == ("Condition/extra",)
    assert assessment.extrapulmonary_organs == (organ,)
    assert assessment.score_min == 1 and assessment.recommendation == "consider-nat"


@pytest.mark.parametrize(
    "system,code",
    [
        pytest.param(ICD10CM, "C78.2", id="pleura-C78.2"),
        pytest.param(ICD10CM, "C78.1", id="mediastinum-C78.1"),
        pytest.param(ICD10CM, "C77.1", id="intrathoracic-nodes-C77.1"),
        pytest.param(SNOMED, "94408005", id="mediastinal-nodes-snomed"),
        pytest.param(SNOMED, "94493005", id="pleura-snomed"),
    ],
)
def test_thoracic_sites_are_not_extrapulmonary(system, code):
    assessment = assess(*low_risk(condition(system, code)))
    assert assessment.factors[3].status == ABSENT
    assert assessment.extrapulmonary_organs == ()


@pytest.mark.parametrize("system,code", [(ICD10CM, "C78.1"), (ICD10CM, "C77.1"), (SNOMED, "94408005")])
def test_hilar_mediastinal_disease_is_an_adverse_feature_that_changes_nothing_else(system, code):
    assessment = assess(*low_risk(condition(system, code, id="nodes")))
    assert [m.source for m in assessment.thoracic] == ["Condition/nodes"]
    assert assessment.recommendation == "upfront-local-therapy"


@pytest.mark.parametrize("verification", ["entered-in-error", "refuted"])
def test_excluded_extrapulmonary_metastasis_does_not_count(verification):
    bone = condition(SNOMED, BONE_MET_SNOMED, verification=verification)
    assert assess(*low_risk(bone)).factors[3].status == ABSENT


def test_resolved_extrapulmonary_metastasis_still_counts():
    bone = condition(SNOMED, BONE_MET_SNOMED)
    bone["clinicalStatus"]["coding"][0]["code"] = "resolved"
    assert assess(*low_risk(bone)).factors[3].status == PRESENT


def test_left_and_right_adrenal_are_one_organ():
    left = condition(SNOMED, "353721000119100", id="adrenal-l")
    right = condition(SNOMED, "353571000119109", id="adrenal-r")
    assessment = assess(*low_risk(left, right))
    assert assessment.extrapulmonary_organs == ("adrenal",)
    assert assessment.factors[3].sources == ("Condition/adrenal-l", "Condition/adrenal-r")
    assert assessment.reasons_not_oligometastatic == ()
    assert assessment.recommendation == "consider-nat"


def test_two_extrapulmonary_organs_are_not_oligometastatic():
    assessment = assess(*low_risk(condition(SNOMED, BONE_MET_SNOMED), condition(SNOMED, BRAIN_MET_SNOMED)))
    assert assessment.extrapulmonary_organs == ("bone", "brain")
    assert assessment.reasons_not_oligometastatic
    assert assessment.recommendation == "systemic-therapy-first"


def test_kidney_and_skin_are_two_organs_though_terminology_groups_both_as_other():
    kidney = condition(ICD10CM, "C79.00", id="kidney")
    skin = condition(ICD10CM, "C79.2", id="skin")
    assessment = assess(*low_risk(kidney, skin))
    assert assessment.extrapulmonary_organs == ("kidney", "skin")
    assert assessment.recommendation == "systemic-therapy-first"


def test_two_other_specified_site_conditions_count_as_one_organ():
    first = condition(ICD10CM, "C79.89", id="other-1")
    second = condition(ICD10CM, "C79.89", id="other-2", onset="2022-06-01")
    assessment = assess(*low_risk(first, second))
    assert assessment.extrapulmonary_organs == ("other",)
    assert assessment.recommendation == "consider-nat"


@pytest.mark.parametrize("body_site", [LUNG_BODY_SITE, None])
def test_lymphangitic_carcinomatosis_means_systemic_therapy_first(body_site):
    lymphangitic = condition(SNOMED, LYMPHANGITIC_SNOMED, body_site=body_site, id="lymph")
    assessment = assess(*low_risk(lymphangitic))
    assert [m.source for m in assessment.lymphangitic] == ["Condition/lymph"]
    assert assessment.factors[3].status == ABSENT
    assert assessment.recommendation == "systemic-therapy-first"


@pytest.mark.parametrize(
    "system,code",
    [(ICD10CM, "C78.2"), (SNOMED, "94493005"), (ICD10CM, "J91.0")],
    ids=["pleura-icd", "pleura-snomed", "malignant-pleural-effusion"],
)
def test_pleural_dissemination_means_systemic_therapy_first(system, code):
    assessment = assess(*low_risk(condition(system, code, id="pleura")))
    assert [m.source for m in assessment.pleural] == ["Condition/pleura"]
    assert assessment.factors[3].status == ABSENT
    assert assessment.recommendation == "systemic-therapy-first"


@pytest.mark.parametrize(
    "site", [LIVER_BODY_SITE, "48521005", "69842003"], ids=["liver", "right-lobe", "left-lobe"]
)
def test_generic_metastasis_code_with_liver_body_site_counts_as_liver(site):
    generic = condition(SNOMED, GENERIC_MET_SNOMED, body_site=site, id="generic")
    assessment = assess(*low_risk(generic))
    assert assessment.factors[3].status == PRESENT
    assert assessment.extrapulmonary_organs == ("liver",)
    assert assessment.liver_involved


ICDO3 = "http://terminology.hl7.org/CodeSystem/icd-o-3"


@pytest.mark.parametrize(
    "system,site",
    [
        (SNOMED, LUNG_BODY_SITE),
        (SNOMED, "3341006"),  # right lung
        (SNOMED, "44029006"),  # left lung
        (SNOMED, "31094006"),  # a lung lobe (mCODE's own example)
        (ICDO3, "C34.9"),  # ICD-O-3 topography, with or without the dot
        (ICDO3, "C341"),
    ],
)
def test_generic_metastasis_code_with_lung_body_site_is_a_lung_metastasis(system, site):
    generic = condition(SNOMED, GENERIC_MET_SNOMED, onset="2022-06-01")
    generic["bodySite"] = [concept(system, site)]
    facts = derive_facts(chart(crc(), generic))
    assert facts.in_scope and [m.organ for m in facts.metastases] == ["lung"]


@pytest.mark.parametrize(
    "system,site,organ",
    [(SNOMED, "272673000", "bone"), (SNOMED, "12738006", "brain"), (ICDO3, "C74.0", "adrenal")],
)
def test_generic_metastasis_code_with_another_organ_body_site_is_extrapulmonary(system, site, organ):
    generic = condition(SNOMED, GENERIC_MET_SNOMED, id="generic")
    generic["bodySite"] = [concept(system, site)]
    assessment = assess(*low_risk(generic))
    assert assessment.factors[3].status == PRESENT
    assert assessment.extrapulmonary_organs == (organ,)


def test_generic_metastasis_code_without_body_site_makes_extrapulmonary_unknown():
    generic = condition(SNOMED, GENERIC_MET_SNOMED, id="generic")
    assessment = assess(*low_risk(generic))
    factor = assessment.factors[3]
    assert factor.status == UNKNOWN and factor.reason
    assert factor.sources == ("Condition/generic",)
    assert assessment.recommendation == "complete-risk-data"


def test_extrapulmonary_factor_directly():
    facts = derive_facts(chart(*low_risk(condition(SNOMED, BONE_MET_SNOMED, onset="2021-05-01"))))
    factor, organs = extrapulmonary_factor(facts)
    assert factor.status == PRESENT and organs == ("bone",)
    assert factor.date.isoformat() == "2021-05-01"


# --- score range and groups (§3; docs/service-contract.md) -----------------------------------------------


def test_score_is_a_range_from_present_to_present_plus_unknown():
    # CEA present; DFI unknown (no resection); nodal unknown (no data); extrapulmonary absent.
    assessment = assess(*low_risk(cea(12.0, date="2022-05-30"), without=("resection", "nodal")))
    assert statuses(assessment) == {
        "cea_gt_5": PRESENT,
        "dfi_lt_24m": UNKNOWN,
        "node_positive_primary": UNKNOWN,
        "extrapulmonary_metastases": ABSENT,
    }
    assert (assessment.score_min, assessment.score_max) == (1, 3)
    assert assessment.group == "undetermined"
    assert [f.id for f in assessment.unknown] == ["dfi_lt_24m", "node_positive_primary"]
    assert [f.id for f in assessment.present] == ["cea_gt_5"]


def test_all_four_factors_present_is_high_risk():
    resources = [
        crc(onset="2019-01-10"),
        lung_met(onset="2020-01-10"),
        resection("2019-02-01"),
        cea(12.0, date="2020-01-05"),
        n_category("pathologic", PN1),
        condition(SNOMED, BONE_MET_SNOMED),
    ]
    assessment = assess(*resources)
    assert (assessment.score_min, assessment.score_max, assessment.group) == (4, 4, "high")
    assert assessment.recommendation == "consider-nat"


@pytest.mark.parametrize(
    "score_min,score_max,group",
    [
        (0, 0, "low"),
        (1, 1, "moderate"),
        (1, 2, "moderate"),
        (2, 2, "moderate"),
        (3, 3, "high"),
        (3, 4, "high"),
        (4, 4, "high"),
        (0, 1, "undetermined"),
        (2, 3, "undetermined"),
        (0, 4, "undetermined"),
    ],
)
def test_group_of_score_range(score_min, score_max, group):
    assert group_of(score_min, score_max, lung_params().groups) == group


def test_lung_groups_are_those_of_seed_000():
    assert lung_params().groups == {"low": (0, 0), "moderate": (1, 2), "high": (3, 4)}
    assert lung_params().cea_threshold_ng_ml == 5.0
    assert lung_params().dfi_limit_months == 24
    assert lung_params().max_extrapulmonary_organs == 1


# --- the pathway rows (§4; docs/service-contract.md) ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,recommendation",
    [
        (
            {"local_therapy_done": True, "ablation_planned": True, "systemic_started": True},
            "post-local-therapy-follow-up",
        ),
        (
            {"ablation_planned": True, "systemic_started": True, "not_oligometastatic": True},
            "ablation-guidance",
        ),
        ({"systemic_started": True, "not_oligometastatic": True}, "assess-nat-response"),
    ],
)
def test_recommend_treatment_states_come_first(kwargs, recommendation):
    """Service contract §4: post-local-therapy-follow-up, ablation-guidance, assess-nat-response, first match wins."""
    args = {
        "local_therapy_done": False,
        "not_oligometastatic": False,
        "score_min": 2,
        "score_max": 3,
    } | kwargs
    assert recommend(**args) == recommendation


@pytest.mark.parametrize(
    "done,not_oligo,score_min,score_max,recommendation",
    [
        (True, True, 3, 4, "post-local-therapy-follow-up"),
        (True, False, 0, 0, "post-local-therapy-follow-up"),
        (False, True, 0, 0, "systemic-therapy-first"),
        (False, True, 2, 4, "systemic-therapy-first"),
        (False, False, 1, 1, "consider-nat"),
        (False, False, 1, 4, "consider-nat"),
        (False, False, 4, 4, "consider-nat"),
        (False, False, 0, 0, "upfront-local-therapy"),
        (False, False, 0, 1, "complete-risk-data"),
        (False, False, 0, 4, "complete-risk-data"),
    ],
)
def test_recommend_first_match_wins(done, not_oligo, score_min, score_max, recommendation):
    got = recommend(
        local_therapy_done=done, not_oligometastatic=not_oligo, score_min=score_min, score_max=score_max
    )
    assert got == recommendation


def test_consider_nat_when_score_minimum_is_at_least_one():
    assessment = assess(*low_risk(cea(12.0, date="2022-05-30")))
    assert (assessment.score_min, assessment.score_max, assessment.group) == (1, 1, "moderate")
    assert assessment.recommendation == "consider-nat"


def test_consider_nat_even_with_unknowns_when_minimum_is_one():
    assessment = assess(*low_risk(n_category("pathologic", PN1, "2019-03-01"), without=("cea",)))
    assert (assessment.score_min, assessment.score_max) == (1, 2)
    assert assessment.recommendation == "consider-nat"


def test_upfront_local_therapy_when_score_is_exactly_zero():
    assessment = assess(*low_risk())
    assert (assessment.score_min, assessment.score_max, assessment.group) == (0, 0, "low")
    assert assessment.recommendation == "upfront-local-therapy"


@pytest.mark.parametrize(
    "without,score_max",
    [
        (("cea",), 1),
        (("resection",), 1),
        (("nodal",), 1),
        (("cea", "nodal"), 2),
        (("cea", "resection", "nodal"), 3),
    ],
)
def test_complete_risk_data_when_unknowns_decide(without, score_max):
    assessment = assess(*low_risk(without=without))
    assert (assessment.score_min, assessment.score_max) == (0, score_max)
    assert assessment.group == "undetermined"
    assert assessment.recommendation == "complete-risk-data"


def test_systemic_therapy_first_beats_consider_nat():
    assessment = assess(
        *low_risk(
            cea(12.0, date="2022-05-30"), condition(SNOMED, BONE_MET_SNOMED), condition(SNOMED, "94225005")
        )
    )
    assert assessment.score_min == 2
    assert assessment.recommendation == "systemic-therapy-first"


@pytest.mark.parametrize(
    "therapy",
    [
        pytest.param(procedure(SNOMED, WEDGE_SNOMED, performed="2022-07-01"), id="wedge-snomed"),
        pytest.param(procedure(SNOMED, "173171007", performed="2022-07-01"), id="lobectomy-snomed"),
        pytest.param(procedure(CPT, "32666", performed="2022-07-01"), id="vats-wedge-cpt"),
        pytest.param(procedure(CPT, "32998", performed="2022-07-01"), id="rfa-cpt"),
        pytest.param(procedure(PCS, "0BTC4ZZ", performed="2022-07-01"), id="lobectomy-pcs"),
        pytest.param(
            procedure(CPT, "77373", performed="2022-07-01", body_site=LUNG_BODY_SITE),
            id="sbrt-lung-body-site",
        ),
        pytest.param(
            procedure(CPT, "77373", performed="2022-07-01", reason="Condition/lung-met"),
            id="sbrt-reason-lung-met",
        ),
        pytest.param(
            procedure(CPT, "77373", performed="2022-07-01", body_site="3341006"), id="sbrt-right-lung"
        ),
        pytest.param(
            {
                **procedure(CPT, "77373", performed="2022-07-01"),
                "reasonCode": [
                    {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C78.01"}]}
                ],
            },
            id="sbrt-reason-code-lung-met",
        ),
    ],
)
def test_post_local_therapy_follow_up_after_completed_lung_therapy(therapy):
    therapy["id"] = "therapy"
    assessment = assess(*low_risk(therapy))
    assert [t.source for t in assessment.local_therapy_done] == ["Procedure/therapy"]
    assert assessment.recommendation == "post-local-therapy-follow-up"


def test_post_local_therapy_follow_up_wins_over_systemic_therapy_first():
    wedge = procedure(SNOMED, WEDGE_SNOMED, performed="2022-07-01")
    lymphangitic = condition(SNOMED, LYMPHANGITIC_SNOMED, body_site=LUNG_BODY_SITE)
    assert assess(*low_risk(wedge, lymphangitic)).recommendation == "post-local-therapy-follow-up"


@pytest.mark.parametrize(
    "therapy",
    [
        pytest.param(procedure(CPT, "77373", performed="2022-07-01"), id="sbrt-no-site"),
        pytest.param(
            procedure(CPT, "77373", performed="2022-07-01", body_site=LIVER_BODY_SITE),
            id="sbrt-liver-body-site",
        ),
        pytest.param(
            procedure(CPT, "77373", performed="2022-07-01", reason="Condition/crc"), id="sbrt-reason-primary"
        ),
        pytest.param(
            procedure(SNOMED, WEDGE_SNOMED, "not-done", performed="2022-07-01"), id="wedge-not-done"
        ),
        pytest.param(
            procedure(SNOMED, WEDGE_SNOMED, "entered-in-error", performed="2022-07-01"),
            id="wedge-entered-in-error",
        ),
        pytest.param(
            procedure(SNOMED, WEDGE_SNOMED, "preparation", performed="2022-07-01"), id="wedge-planned"
        ),
        pytest.param(procedure(CPT, "47120", performed="2022-07-01"), id="hepatectomy"),
        pytest.param(
            procedure(SNOMED, WEDGE_SNOMED, performed="2022-07-01", subject="Patient/other"),
            id="other-patient",
        ),
    ],
)
def test_no_follow_up_without_a_completed_lung_therapy(therapy):
    assessment = assess(*low_risk(therapy))
    assert assessment.local_therapy_done == ()
    assert assessment.recommendation == "upfront-local-therapy"


# --- synchronous / metachronous (§2, §8.3) -----------------------------------------------------------


@pytest.mark.parametrize(
    "detected,timing",
    [("2019-06-01", "synchronous"), ("2019-07-10", "synchronous"), ("2019-08-01", "metachronous")],
)
def test_timing_is_within_six_months_of_primary_diagnosis(detected, timing):
    resources = [crc(onset="2019-01-10"), lung_met(onset=detected)]
    assert assess(*resources).timing == timing


# --- medication records the FHIR server would not give (docs/clinical-decisions.md) ---------------


def assess_unread(*resources, unread: frozenset[str] = frozenset({"MedicationRequest"})):
    c = chart(*resources)
    c.unread = unread
    assessment = assess_lung(derive_facts(c))
    assert assessment is not None
    return assessment


def test_medications_unread_make_a_cea_that_may_be_on_treatment_unknown():
    # Lung metastases found 2022-06-01; CEA 12 at detection, 3 three months later. With the
    # medication records read and empty the latest (3) is used: absent. Unread, systemic therapy may
    # have begun in between, when the rule of §8.4 would have used 12: the factor is unknown.
    resources = [
        *low_risk(without=("cea",)),
        cea(12.0, date="2022-06-10", id="cea-12"),
        cea(3.0, date="2022-09-01", id="cea-3"),
    ]
    read = assess(*resources).factors[0]
    assert (read.status, read.sources) == (ABSENT, ("Observation/cea-3",))
    unread = assess_unread(*resources)
    f = unread.factors[0]
    assert f.status == UNKNOWN
    assert f.sources == ("Observation/cea-12", "Observation/cea-3")
    assert "medication records not read" in (f.reason or "") and "2022-06-10" in (f.reason or "")
    assert (unread.score_min, unread.score_max, unread.recommendation) == (0, 1, "complete-risk-data")


def test_medications_unread_change_nothing_when_every_possible_cea_agrees():
    # One CEA at detection; or every CEA since the metastases on the same side of 5 ng/mL.
    single = assess_unread(*low_risk(without=("cea",)), cea(3.0, date="2022-06-10", id="cea-3"))
    assert single.factors[0].status == ABSENT and single.recommendation == "upfront-local-therapy"
    high = assess_unread(
        *low_risk(without=("cea",)),
        cea(3.0, date="2021-01-05", id="cea-old"),  # before the last pre-detection CEA: never a candidate
        cea(9.0, date="2022-05-20", id="cea-9"),
        cea(14.0, date="2022-09-01", id="cea-14"),
    )
    assert high.factors[0].status == PRESENT and high.factors[0].sources == ("Observation/cea-14",)
    # Other unread types leave the CEA alone.
    other = assess_unread(
        *low_risk(without=("cea",)),
        cea(12.0, date="2022-06-10", id="cea-12"),
        cea(3.0, date="2022-09-01", id="cea-3"),
        unread=frozenset({"BodyStructure", "ServiceRequest"}),
    )
    assert other.factors[0].status == ABSENT


def test_medications_unread_reach_back_to_the_last_cea_before_detection():
    # 3 before detection, 12 after: therapy begun between them would make the rule use 3.
    a = assess_unread(
        *low_risk(without=("cea",)),
        cea(3.0, date="2022-05-20", id="cea-3"),
        cea(12.0, date="2022-07-01", id="cea-12"),
    )
    assert a.factors[0].status == UNKNOWN and a.factors[0].sources == (
        "Observation/cea-3",
        "Observation/cea-12",
    )

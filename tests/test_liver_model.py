"""The Fong clinical risk score for liver metastases and the liver card.

docs/clinical-rules.md §5 and §8 (3, 7, 8, 9, 12, 16, 18, 19); docs/service-contract.md (liver factor ids, groups,
recommendations). Each factor's present / absent / unknown cases, the CEA > 200 threshold with
comparators, the CEA rule before liver treatment, the groups, every liver recommendation, and what the
card must say, built from small FHIR charts (tests/builders.py).
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from fhir.resources.R4B import get_fhir_model_class

from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.knowledge.thresholds import group_of, liver_params
from cds_service.clinical.scoring.factors import ABSENT, PRESENT, UNKNOWN
from cds_service.clinical.scoring.liver import FACTOR_IDS, assess_liver, recommend
from cds_service.clinical.scoring.lung import assess_lung
from cds_service.hooks.models import answer_json
from cds_service.render.cards import liver_card
from cds_service.render.evidence_pages import model_page

from .builders import (
    BONE_MET_SNOMED,
    BRAIN_MET_SNOMED,
    CPT,
    HEPATECTOMY_CPT,
    ICD10CM,
    LEFT_LIVER_LOBE,
    LUNG_BODY_SITE,
    LYMPHANGITIC_SNOMED,
    POLYPECTOMY_SNOMED,
    RIGHT_LIVER_LOBE,
    SNOMED,
    WEDGE_SNOMED,
    cea,
    chart,
    condition,
    crc,
    liver_met,
    lung_met,
    medication_request,
    n_category,
    procedure,
    resection,
    tumor,
    tumor_size,
)

PN0, PN1, CN1 = "1229947003", "1229951001", "1229973008"
PERITONEUM_MET_SNOMED = "94627008"
MEDIASTINAL_NODES_SNOMED = "94408005"
TODAY = dt.date(2024, 1, 15)
ESMO_DOI = "https://doi.org/10.1093/annonc/mdw235"
NO_LESIONS = ("tumor", "size")  # low_crs() parts: the liver Tumor and its TumorSize
LIVER_RECOMMENDATIONS = (
    "consider-neoadjuvant-chemotherapy",
    "upfront-hepatectomy",
    "complete-risk-data",
    "systemic-therapy-first",
    "post-local-therapy-follow-up",  # an extension value (README): the liver metastases are treated
)


def low_crs(*extra, without: tuple[str, ...] = ()) -> list[dict]:
    """Liver only, every factor known and absent (CRS 0): `extra` adds resources, `without` drops parts.

    Resection 2019-02-01 -> liver metastasis 2021-01-10 = 709 d = 23.3 months (>= 12); pN0; one liver
    Tumor measured 3.0 cm; CEA 12 ng/mL.
    """
    parts = {
        "crc": crc(onset="2019-01-10"),
        "resection": resection("2019-02-01"),
        "nodal": n_category("pathologic", PN0),
        "liver": liver_met(onset="2021-01-10"),
        "tumor": tumor(id="t1", related="Condition/liver-met"),
        "size": tumor_size(3.0, focus="BodyStructure/t1", id="size-1"),
        "cea": cea(12, date="2021-01-05", id="cea-12"),
    }
    return [r for name, r in parts.items() if name not in without] + list(extra)


def high_crs(*extra, without: tuple[str, ...] = ()) -> list[dict]:
    """CRS 3 of 5: pN1, liver metastasis 7.2 months after the resection, CEA 250 (count 1, size 3 cm)."""
    return low_crs(
        n_category("pathologic", PN1),
        liver_met(onset="2019-09-09"),  # 2019-02-01 -> 2019-09-09 = 220 d = 7.2 months
        cea(250, date="2019-09-02", id="cea-250"),
        *extra,
        without=("nodal", "liver", "cea", *without),
    )


def assess(*resources):
    facts = derive_facts(chart(*resources))
    assessment = assess_liver(facts, assess_lung(facts))
    assert assessment is not None, "the chart has no liver metastasis"
    return assessment


def factor(assessment, factor_id: str):
    return next(f for f in assessment.factors if f.id == factor_id)


def statuses(assessment) -> dict[str, str]:
    return {f.id: f.status for f in assessment.factors}


def card(*resources) -> dict:
    """The liver card as the EHR receives it (engine order: lung verdict first, then the liver)."""
    facts = derive_facts(chart(*resources))
    assessment = assess_liver(facts, assess_lung(facts))
    assert assessment is not None
    rendered = liver_card(assessment, facts, hook_instance="fixed-instance", today=TODAY, cea_max_age_days=90)
    return answer_json([rendered])["cards"][0]


def assessment_json(c: dict) -> dict:
    return c["extension"]["crc-cds-assessment"]


def other_organs(*snomed_codes: str) -> list[dict]:
    return [condition(SNOMED, code, onset="2021-01-10", id=f"met-{code}") for code in snomed_codes]


# --- the builders added for the liver ----------------------------------------------------------------


@pytest.mark.parametrize(
    "resource",
    [
        liver_met(body_site=RIGHT_LIVER_LOBE),
        tumor(related="Condition/liver-met", active=False),
        tumor(location=None, patient="Patient/other"),
        tumor_size(62, "mm", focus="BodyStructure/t1"),
        tumor_size(6.0, focus="Condition/liver-met", component=False, status="preliminary", date=None),
        medication_request(),
    ],
    ids=lambda r: r["resourceType"],
)
def test_every_new_builder_makes_valid_fhir_r4(resource):
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


# --- scope and shape ----------------------------------------------------------------------------------


def test_no_liver_metastasis_means_no_liver_assessment():
    facts = derive_facts(chart(crc(), resection(), lung_met()))
    assert assess_liver(facts, assess_lung(facts)) is None


def test_factor_ids_and_order_are_those_of_the_service_contract():
    a = assess(*low_crs())
    assert FACTOR_IDS == (
        "node_positive_primary",
        "dfi_lt_12m",
        "multiple_liver_metastases",
        "cea_gt_200",
        "largest_liver_metastasis_gt_5cm",
    )
    assert tuple(f.id for f in a.factors) == FACTOR_IDS


def test_low_crs_baseline_has_every_factor_absent():
    a = assess(*low_crs())
    assert set(statuses(a).values()) == {ABSENT}
    assert (a.score_min, a.score_max, a.group, a.recommendation) == (0, 0, "low", "upfront-hepatectomy")


def test_liver_parameters_are_those_of_seed_002():
    params = liver_params()
    assert params.model == "fong-crs-liver"
    assert params.cea_threshold_ng_ml == 200.0
    assert params.dfi_limit_months == 12
    assert params.largest_lesion_limit_cm == 5.0
    assert params.groups == {"low": (0, 2), "high": (3, 5)}
    assert params.max_other_organs == 1


# --- node-positive primary ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodal,status",
    [
        (n_category("pathologic", PN1), PRESENT),
        (n_category("pathologic", PN0), ABSENT),
        (n_category("clinical", CN1), PRESENT),
        (None, UNKNOWN),
    ],
    ids=["pN1", "pN0", "cN1", "none"],
)
def test_node_positive_primary(nodal, status):
    f = factor(assess(*low_crs(*([nodal] if nodal else []), without=("nodal",))), "node_positive_primary")
    assert f.status == status
    if status == UNKNOWN:
        assert f.reason


# --- liver metastasis synchronous or within 12 months (§5, §8.3) --------------------------------------


@pytest.mark.parametrize(
    "detected,status",
    [
        ("2019-01-20", PRESENT),  # found before the resection of 2019-02-01
        ("2019-02-01", PRESENT),  # on the day of the resection
        ("2019-09-09", PRESENT),  # 220 d = 7.2 months
        ("2020-02-01", PRESENT),  # 365 d = 11.99 months: still within 12 months
        ("2020-02-02", ABSENT),  # 366 d = 12.02 months
        ("2021-01-10", ABSENT),  # 709 d = 23.3 months
    ],
)
def test_liver_timing_counts_from_the_primary_resection(detected, status):
    f = factor(assess(*low_crs(liver_met(onset=detected), without=("liver",))), "dfi_lt_12m")
    assert f.status == status
    assert "Procedure/resection" in f.sources and "Condition/liver-met" in f.sources
    assert f.date == dt.date.fromisoformat(detected)


def test_liver_found_before_the_resection_says_so():
    f = factor(assess(*low_crs(liver_met(onset="2019-01-20"), without=("liver",))), "dfi_lt_12m")
    assert f.status == PRESENT and "on or before the primary resection of 2019-02-01" in (f.value or "")


@pytest.mark.parametrize(
    "detected,status",
    [
        ("2019-01-03", PRESENT),  # before the diagnosis of 2019-01-10
        ("2019-09-02", PRESENT),  # 235 d = 7.7 months after the diagnosis
        ("2020-02-10", ABSENT),  # 396 d = 13.0 months
    ],
)
def test_without_a_resection_the_timing_counts_from_the_primary_diagnosis(detected, status):
    f = factor(assess(*low_crs(liver_met(onset=detected), without=("liver", "resection"))), "dfi_lt_12m")
    assert f.status == status
    assert "primary diagnosis" in (f.value or "")
    assert "Condition/crc" in f.sources


@pytest.mark.parametrize(
    "instead",
    [
        procedure(SNOMED, POLYPECTOMY_SNOMED, performed="2019-02-01", id="polypectomy"),
        resection(None),
    ],
    ids=["polypectomy-only", "undated-resection"],
)
def test_a_polypectomy_or_an_undated_resection_is_no_resection_date(instead):
    # Diagnosis 2019-01-10 -> liver 2019-09-02 = 7.7 months: present from the diagnosis date (§8.3).
    f = factor(
        assess(*low_crs(instead, liver_met(onset="2019-09-02"), without=("liver", "resection"))), "dfi_lt_12m"
    )
    assert f.status == PRESENT and "primary diagnosis" in (f.value or "")


def test_timing_unknown_without_resection_or_diagnosis_date():
    f = factor(assess(*low_crs(crc(onset=None), without=("crc", "resection"))), "dfi_lt_12m")
    assert f.status == UNKNOWN and "neither a primary resection date nor a primary diagnosis date" in f.reason


def test_timing_unknown_when_the_liver_metastasis_has_no_date():
    f = factor(assess(*low_crs(liver_met(onset=None), without=("liver",))), "dfi_lt_12m")
    assert f.status == UNKNOWN and "no onset or recorded date" in f.reason


# --- more than one liver metastasis (§8.16) -----------------------------------------------------------


def test_one_liver_metastasis_condition_says_nothing_about_the_count():
    f = factor(assess(*low_crs(without=NO_LESIONS)), "multiple_liver_metastases")
    assert f.status == UNKNOWN and "how many liver metastases" in f.reason


@pytest.mark.parametrize(
    "sites,status",
    [
        ((RIGHT_LIVER_LOBE,), UNKNOWN),
        ((RIGHT_LIVER_LOBE, RIGHT_LIVER_LOBE), UNKNOWN),
        ((RIGHT_LIVER_LOBE, LEFT_LIVER_LOBE), PRESENT),
    ],
    ids=["one-site", "same-site-twice", "two-sites"],
)
def test_liver_metastasis_conditions_count_by_distinct_body_site(sites, status):
    mets = [liver_met(body_site=site, id=f"liver-met-{i}") for i, site in enumerate(sites)]
    f = factor(assess(*low_crs(*mets, without=(*NO_LESIONS, "liver"))), "multiple_liver_metastases")
    assert f.status == status
    if status == PRESENT:
        assert set(f.sources) == {"Condition/liver-met-0", "Condition/liver-met-1"}


def test_a_refuted_liver_metastasis_is_not_a_second_site():
    mets = [
        liver_met(body_site=RIGHT_LIVER_LOBE, id="liver-met-0"),
        liver_met(body_site=LEFT_LIVER_LOBE, id="liver-met-1", verification="refuted"),
    ]
    f = factor(assess(*low_crs(*mets, without=(*NO_LESIONS, "liver"))), "multiple_liver_metastases")
    assert f.status == UNKNOWN


@pytest.mark.parametrize(
    "tumors,status",
    [
        ([tumor(id="t1")], ABSENT),
        ([tumor(id="t1"), tumor(id="t2")], PRESENT),
        # The organ from the related liver-metastasis Condition when the Tumor has no location.
        (
            [
                tumor(id="t1", location=None, related="Condition/liver-met"),
                tumor(id="t2", location=None, related="Condition/liver-met"),
            ],
            PRESENT,
        ),
        # Located at a liver lobe, with no related Condition: still the liver.
        ([tumor(id="t1", location=RIGHT_LIVER_LOBE), tumor(id="t2", location=LEFT_LIVER_LOBE)], PRESENT),
        ([tumor(id="t1"), tumor(id="t2", active=False)], ABSENT),
        ([tumor(id="t1"), tumor(id="t2", location=LUNG_BODY_SITE)], ABSENT),
        ([tumor(id="t1"), tumor(id="t2", patient="Patient/other")], ABSENT),  # §8.17
    ],
    ids=[
        "one",
        "two",
        "two-by-related-condition",
        "two-at-liver-lobes",
        "one-inactive",
        "one-in-the-lung",
        "another-patient",
    ],
)
def test_liver_tumor_body_structures_count_the_lesions(tumors, status):
    f = factor(assess(*low_crs(*tumors, without=NO_LESIONS)), "multiple_liver_metastases")
    assert f.status == status
    assert "BodyStructure/t1" in f.sources


def test_one_tumor_does_not_outvote_two_liver_sites():
    mets = [
        liver_met(body_site=RIGHT_LIVER_LOBE, id="liver-met-0"),
        liver_met(body_site=LEFT_LIVER_LOBE, id="liver-met-1"),
    ]
    resources = low_crs(
        *mets, tumor(id="t1", related="Condition/liver-met-0"), without=(*NO_LESIONS, "liver")
    )
    assert factor(assess(*resources), "multiple_liver_metastases").status == PRESENT


@pytest.mark.parametrize(
    "dates,status",
    [(("2021-01-12", "2021-01-12"), PRESENT), (("2021-01-12", "2021-04-12"), UNKNOWN)],
    ids=["two-lesions-measured-one-day", "one-lesion-followed-over-time"],
)
def test_tumor_sizes_on_the_liver_metastasis_count_lesions_measured_the_same_day(dates, status):
    sizes = [
        tumor_size(2.0, focus="Condition/liver-met", date=dates[0], id="size-a"),
        tumor_size(3.0, focus="Condition/liver-met", date=dates[1], id="size-b"),
    ]
    f = factor(assess(*low_crs(*sizes, without=NO_LESIONS)), "multiple_liver_metastases")
    assert f.status == status
    if status == PRESENT:
        assert f.sources == ("Observation/size-a", "Observation/size-b")


# --- largest liver metastasis > 5 cm (TumorSize longest dimension) -------------------------------------


def test_size_unknown_without_a_tumor_size():
    f = factor(assess(*low_crs(without=("size",))), "largest_liver_metastasis_gt_5cm")
    assert f.status == UNKNOWN and "TumorSize" in f.reason


@pytest.mark.parametrize(
    "value,unit,status,shown",
    [
        (62, "mm", PRESENT, "6.2 cm"),
        (51, "mm", PRESENT, "5.1 cm"),
        (50, "mm", ABSENT, "5.0 cm"),  # exactly 5 cm is not > 5 cm
        (5.0, "cm", ABSENT, "5.0 cm"),
        (5.1, "cm", PRESENT, "5.1 cm"),
        (3.0, "cm", ABSENT, "3.0 cm"),
    ],
)
def test_size_threshold_in_mm_and_cm(value, unit, status, shown):
    size = tumor_size(value, unit, focus="BodyStructure/t1", id="size-x")
    f = factor(assess(*low_crs(size, without=("size",))), "largest_liver_metastasis_gt_5cm")
    assert (f.status, f.value) == (status, shown)
    assert f.sources == ("Observation/size-x",) and f.date == dt.date(2021, 1, 12)


def test_size_from_the_observation_value_when_there_is_no_component():
    size = tumor_size(6.0, focus="BodyStructure/t1", component=False)
    assert (
        factor(assess(*low_crs(size, without=("size",))), "largest_liver_metastasis_gt_5cm").status == PRESENT
    )


@pytest.mark.parametrize(
    "size",
    [
        tumor_size(3.0, "[in_i]", focus="BodyStructure/t1"),  # mCODE allows mm and cm only
        tumor_size(6.0, focus="BodyStructure/t1", status="preliminary"),
        tumor_size(6.0, focus="BodyStructure/t1", subject="Patient/other"),  # §8.17
    ],
    ids=["inches", "preliminary", "another-patient"],
)
def test_sizes_that_cannot_be_used_leave_the_size_unknown(size):
    f = factor(assess(*low_crs(size, without=("size",))), "largest_liver_metastasis_gt_5cm")
    assert f.status == UNKNOWN


def test_size_linked_to_the_liver_metastasis_condition_counts():
    size = tumor_size(62, "mm", focus="Condition/liver-met")
    f = factor(assess(*low_crs(size, without=NO_LESIONS)), "largest_liver_metastasis_gt_5cm")
    assert (f.status, f.value) == (PRESENT, "6.2 cm")


def test_a_lung_lesion_size_is_not_a_liver_size():
    lung_tumor = tumor(id="lung-t", location=LUNG_BODY_SITE)
    sizes = [tumor_size(7.0, focus="BodyStructure/lung-t"), tumor_size(7.0, focus="Condition/lung-met")]
    resources = low_crs(lung_met(onset="2021-01-10"), lung_tumor, *sizes, without=NO_LESIONS)
    assert factor(assess(*resources), "largest_liver_metastasis_gt_5cm").status == UNKNOWN


def test_the_largest_of_several_liver_lesions_decides():
    resources = low_crs(
        tumor(id="t2"),
        tumor_size(2.0, focus="BodyStructure/t1", id="small"),
        tumor_size(5.5, focus="BodyStructure/t2", id="large"),
        without=("size",),
    )
    f = factor(assess(*resources), "largest_liver_metastasis_gt_5cm")
    assert (f.status, f.value, f.sources) == (PRESENT, "5.5 cm", ("Observation/large",))


def test_an_unmeasured_liver_lesion_leaves_a_small_largest_size_unknown():
    f = factor(assess(*low_crs(tumor(id="t2"))), "largest_liver_metastasis_gt_5cm")
    assert f.status == UNKNOWN and f.value == "3.0 cm"
    assert "1 liver lesion(s) without a size" in f.reason


def _two_site_lesions(*sizes: dict) -> list[dict]:
    # Liver metastases in the right and left lobes (two lesions, §8.16), no Tumor records.
    sites = (
        liver_met(body_site=RIGHT_LIVER_LOBE, id="right"),
        liver_met(body_site=LEFT_LIVER_LOBE, id="left"),
    )
    return low_crs(*sites, *sizes, without=(*NO_LESIONS, "liver"))


def test_a_lesion_known_from_its_own_site_but_not_measured_leaves_a_small_size_unknown():
    a = assess(*_two_site_lesions(tumor_size(3.0, focus="Condition/right")))
    assert factor(a, "multiple_liver_metastases").status == PRESENT
    f = factor(a, "largest_liver_metastasis_gt_5cm")
    assert f.status == UNKNOWN and "1 liver lesion(s) without a size" in f.reason


def test_every_site_measured_small_makes_the_size_absent():
    sizes = (
        tumor_size(3.0, focus="Condition/right", id="s1"),
        tumor_size(4.0, focus="Condition/left", id="s2"),
    )
    f = factor(assess(*_two_site_lesions(*sizes)), "largest_liver_metastasis_gt_5cm")
    assert (f.status, f.value) == (ABSENT, "4.0 cm")


def test_a_site_measured_through_its_tumor_record_counts_as_measured():
    sizes = (
        tumor(id="t-left", related="Condition/left"),
        tumor_size(3.0, focus="Condition/right", id="s1"),
        tumor_size(4.0, focus="BodyStructure/t-left", id="s2"),
    )
    assert factor(assess(*_two_site_lesions(*sizes)), "largest_liver_metastasis_gt_5cm").status == ABSENT


def test_one_measured_lesion_over_5_cm_is_enough_even_with_unmeasured_ones():
    resources = low_crs(tumor(id="t2"), tumor_size(6.0, focus="BodyStructure/t1"), without=("size",))
    assert factor(assess(*resources), "largest_liver_metastasis_gt_5cm").status == PRESENT


# --- CEA > 200 ng/mL, comparators and units (§5, §8.12) -----------------------------------------------


@pytest.mark.parametrize(
    "value,comparator,unit,status",
    [
        (250, None, "ng/mL", PRESENT),
        (200.5, None, "ng/mL", PRESENT),
        (200, None, "ng/mL", ABSENT),  # > 200 is the factor: exactly 200 is not
        (12, None, "ng/mL", ABSENT),  # above the lung's 5 ng/mL, far below the liver's 200
        (200, ">", "ng/mL", PRESENT),  # every value ">200" allows is above 200
        (250, ">", "ng/mL", PRESENT),
        (150, ">", "ng/mL", UNKNOWN),
        (200, ">=", "ng/mL", UNKNOWN),  # allows exactly 200
        (201, ">=", "ng/mL", PRESENT),
        (200, "<", "ng/mL", ABSENT),
        (200, "<=", "ng/mL", ABSENT),
        (150, "<=", "ng/mL", ABSENT),
        (250, "<", "ng/mL", UNKNOWN),
        (250, None, "ug/L", PRESENT),  # 1 ug/L = 1 ng/mL
        (0.25, None, "ug/mL", PRESENT),  # 250 ng/mL
        (15000, None, "ng/dL", ABSENT),  # 150 ng/mL
    ],
)
def test_cea_above_200(value, comparator, unit, status):
    resources = low_crs(
        cea(value, unit, comparator=comparator, date="2021-01-05", id="cea-x"), without=("cea",)
    )
    f = factor(assess(*resources), "cea_gt_200")
    assert f.status == status
    assert f.sources == ("Observation/cea-x",)
    if status == UNKNOWN:
        assert "does not say whether CEA is above 200 ng/mL" in f.reason


def test_cea_unknown_without_a_readable_cea():
    a = assess(*low_crs(cea(250, "pmol/L", "19167-6", id="cea-molar"), without=("cea",)))
    f = factor(a, "cea_gt_200")
    assert f.status == UNKNOWN and "pmol/L" in f.reason


def test_no_cea_suggests_ordering_one():
    c = card(*low_crs(without=("cea",)))
    f = next(x for x in assessment_json(c)["factors"] if x["id"] == "cea_gt_200")
    assert f["status"] == UNKNOWN and f["reason"] == "no serum CEA result in the chart"
    assert "Order serum CEA" in [s["label"] for s in c["suggestions"]]


def test_each_model_applies_its_own_cea_threshold():
    facts = derive_facts(chart(*low_crs(lung_met(onset="2021-01-10"))))  # CEA 12 ng/mL
    lung = assess_lung(facts)
    liver = assess_liver(facts, lung)
    assert lung is not None and liver is not None
    assert next(f for f in lung.factors if f.id == "cea_gt_5").status == PRESENT
    assert factor(liver, "cea_gt_200").status == ABSENT


# --- which CEA: before liver local therapy or systemic therapy (§8.19) ---------------------------------

# Liver metastasis 2021-01-10; CEA 250 before treatment, 20 after it.
CEA_PAIR = (cea(250, date="2021-02-01", id="cea-before"), cea(20, date="2021-04-01", id="cea-after"))


def hepatectomy(date: str = "2021-03-01", status: str = "completed") -> dict:
    return procedure(CPT, HEPATECTOMY_CPT, status, performed=date, id="hepatectomy")


def test_cea_before_a_hepatectomy_is_used():
    a = assess(*low_crs(*CEA_PAIR, hepatectomy(), without=("cea",)))
    assert a.cea.result is not None and a.cea.result.source == "Observation/cea-before"
    assert factor(a, "cea_gt_200").status == PRESENT
    assert "hepatectomy" in a.cea.rule and "2021-03-01" in a.cea.rule


def test_cea_on_the_day_of_the_hepatectomy_is_not_before_it():
    resources = low_crs(
        cea(250, date="2021-02-01", id="cea-before"),
        cea(20, date="2021-03-01", id="same-day"),
        hepatectomy(),
        without=("cea",),
    )
    assert assess(*resources).cea.result.source == "Observation/cea-before"


def test_cea_before_systemic_therapy_for_the_liver_metastases_is_used():
    a = assess(*low_crs(*CEA_PAIR, medication_request(authored="2021-03-01"), without=("cea",)))
    assert a.cea.result.source == "Observation/cea-before"
    assert "systemic therapy" in a.cea.rule and factor(a, "cea_gt_200").status == PRESENT


def test_the_earliest_treatment_sets_the_cutoff():
    resources = low_crs(
        cea(300, date="2021-02-01", id="cea-300"),
        cea(150, date="2021-03-01", id="cea-150"),
        cea(20, date="2021-05-01", id="cea-20"),
        medication_request(authored="2021-02-10"),
        hepatectomy("2021-04-15"),
        without=("cea",),
    )
    assert assess(*resources).cea.result.source == "Observation/cea-300"


@pytest.mark.parametrize(
    "not_liver_treatment",
    [
        medication_request(authored="2019-03-01"),  # adjuvant chemotherapy, before the liver metastasis
        hepatectomy(status="preparation"),  # planned, not done
    ],
    ids=["adjuvant-before-liver-met", "planned-hepatectomy"],
)
def test_without_liver_treatment_the_latest_cea_is_used(not_liver_treatment):
    a = assess(*low_crs(*CEA_PAIR, not_liver_treatment, without=("cea",)))
    assert a.cea.result.source == "Observation/cea-after" and a.cea.picked_latest
    assert factor(a, "cea_gt_200").status == ABSENT


def test_lung_local_therapy_does_not_move_the_liver_cea_cutoff():
    wedge = procedure(SNOMED, WEDGE_SNOMED, performed="2021-03-01", id="wedge")
    facts = derive_facts(chart(*low_crs(lung_met(onset="2021-01-10"), wedge, *CEA_PAIR, without=("cea",))))
    lung = assess_lung(facts)
    liver = assess_liver(facts, lung)
    assert lung.cea.result.source == "Observation/cea-before"  # §8.4: before the lung metastasectomy
    assert liver.cea.result.source == "Observation/cea-after"  # §8.19: no liver local therapy


def test_no_cea_before_liver_treatment_is_unknown_and_says_why():
    a = assess(*low_crs(cea(20, date="2021-04-01", id="cea-after"), hepatectomy(), without=("cea",)))
    f = factor(a, "cea_gt_200")
    assert f.status == UNKNOWN and "no CEA before the first hepatectomy on 2021-03-01" in f.reason


def test_staleness_is_flagged_only_when_the_latest_cea_was_picked():
    before_hepatectomy = card(*low_crs(*CEA_PAIR, hepatectomy(), without=("cea",)))
    assert "days old" not in before_hepatectomy["detail"]
    latest = card(*low_crs())  # CEA of 2021-01-05, three years before TODAY
    assert "days old" in latest["detail"]
    assert "Order serum CEA" in [s["label"] for s in latest["suggestions"]]


# --- groups and recommendations (docs/service-contract.md) ---------------------------------------------------


@pytest.mark.parametrize(
    "score_min,score_max,group",
    [
        (0, 0, "low"),
        (2, 2, "low"),
        (0, 2, "low"),
        (3, 3, "high"),
        (5, 5, "high"),
        (3, 5, "high"),
        (2, 3, "undetermined"),
        (1, 4, "undetermined"),
        (0, 5, "undetermined"),
    ],
)
def test_liver_groups(score_min, score_max, group):
    assert group_of(score_min, score_max, liver_params().groups) == group


@pytest.mark.parametrize(
    "not_oligo,score_min,score_max,recommendation",
    [
        (False, 3, 3, "consider-neoadjuvant-chemotherapy"),
        (False, 3, 5, "consider-neoadjuvant-chemotherapy"),
        (False, 0, 0, "upfront-hepatectomy"),
        (False, 0, 2, "upfront-hepatectomy"),
        (False, 2, 3, "complete-risk-data"),
        (False, 1, 4, "complete-risk-data"),
        (True, 5, 5, "systemic-therapy-first"),
        (True, 0, 0, "systemic-therapy-first"),
    ],
)
def test_recommend(not_oligo, score_min, score_max, recommendation):
    got = recommend(
        not_oligometastatic=not_oligo, score_min=score_min, score_max=score_max, params=liver_params()
    )
    assert got == recommendation


@pytest.mark.parametrize("not_oligo,score_min,score_max", [(False, 3, 5), (False, 0, 0), (True, 2, 3)])
def test_recommend_after_liver_local_therapy_is_follow_up_whatever_the_score(not_oligo, score_min, score_max):
    got = recommend(
        local_therapy_done=True,
        not_oligometastatic=not_oligo,
        score_min=score_min,
        score_max=score_max,
        params=liver_params(),
    )
    assert got == "post-local-therapy-follow-up"


HEPATECTOMY = procedure(CPT, "47120", performed="2019-10-15", id="hepatectomy")


@pytest.mark.parametrize(
    "therapy",
    [
        HEPATECTOMY,
        procedure(SNOMED, "448781006", performed="2019-10-15", id="liver-rfa"),  # liver ablation
    ],
    ids=["hepatectomy", "ablation"],
)
def test_after_liver_local_therapy_no_advice_before_hepatectomy(therapy):
    # The high-CRS chart (pre-hepatectomy CEA 250) once the liver metastasis has been treated.
    a = assess(*high_crs(therapy, cea(4, date="2019-12-01", id="cea-after")))
    assert a.recommendation == "post-local-therapy-follow-up"
    assert [t.source for t in a.local_therapy_done] == [f"Procedure/{therapy['id']}"]
    assert a.cea.result.source == "Observation/cea-250"  # the CEA from before it (§8.19)
    # Shown for information. The chart's only tumour size is dated after the therapy, so the largest
    # size before treatment is unknown (§8.30): 3..4, still high.
    assert (a.score_min, a.score_max, a.group) == (3, 4, "high")
    c = card(*high_crs(therapy))
    assert c["indicator"] == "info"
    assert "before hepatectomy" not in c["summary"] + c["detail"]
    assert "- Done: " in c["detail"] and therapy["id"] in c["detail"]


@pytest.mark.parametrize("status", ["preparation", "not-done", "entered-in-error"])
def test_liver_local_therapy_not_done_changes_nothing(status):
    planned = procedure(CPT, "47120", status, performed="2019-10-15")
    assert assess(*high_crs(planned)).recommendation == "consider-neoadjuvant-chemotherapy"


def test_crs_3_means_consider_neoadjuvant_chemotherapy():
    a = assess(*high_crs())
    assert statuses(a) == {
        "node_positive_primary": PRESENT,
        "dfi_lt_12m": PRESENT,
        "multiple_liver_metastases": ABSENT,
        "cea_gt_200": PRESENT,
        "largest_liver_metastasis_gt_5cm": ABSENT,
    }
    assert (a.score_min, a.score_max, a.group, a.recommendation) == (
        3,
        3,
        "high",
        "consider-neoadjuvant-chemotherapy",
    )


def test_crs_at_least_3_with_unknowns_still_means_neoadjuvant_chemotherapy():
    a = assess(*high_crs(without=NO_LESIONS))  # count and size unknown
    assert (a.score_min, a.score_max, a.group, a.recommendation) == (
        3,
        5,
        "high",
        "consider-neoadjuvant-chemotherapy",
    )


def test_crs_at_most_2_with_unknowns_means_upfront_hepatectomy():
    # pN1 present; count and size unknown; the rest absent: 1..3 spans the groups...
    spanning = assess(*low_crs(n_category("pathologic", PN1), without=(*NO_LESIONS, "nodal")))
    assert (spanning.score_min, spanning.score_max, spanning.recommendation) == (1, 3, "complete-risk-data")
    # ...while pN0 with the same unknowns is 0..2: low whatever they are.
    a = assess(*low_crs(without=NO_LESIONS))
    assert (a.score_min, a.score_max, a.group, a.recommendation) == (0, 2, "low", "upfront-hepatectomy")


def test_range_spanning_2_and_3_means_complete_the_data():
    # pN1 and liver metastasis 7.2 months after the resection; count and size unknown; CEA 12: 2..4.
    resources = low_crs(
        n_category("pathologic", PN1), liver_met(onset="2019-09-09"), without=(*NO_LESIONS, "nodal", "liver")
    )
    a = assess(*resources)
    assert (a.score_min, a.score_max, a.group, a.recommendation) == (
        2,
        4,
        "undetermined",
        "complete-risk-data",
    )


# --- not oligometastatic: systemic therapy first (§8.18) ------------------------------------------------


@pytest.mark.parametrize(
    "extra,reason",
    [
        (other_organs(BONE_MET_SNOMED, PERITONEUM_MET_SNOMED), "metastases in 2 organs besides the liver"),
        ([condition(ICD10CM, "C78.2", onset="2021-01-10")], "pleural dissemination"),
    ],
    ids=["two-other-organs", "pleura"],
)
def test_liver_without_lung_not_oligometastatic(extra, reason):
    a = assess(*high_crs(*extra))
    assert a.recommendation == "systemic-therapy-first"
    assert reason in a.reasons_not_oligometastatic
    assert (a.score_min, a.score_max) == (3, 3)  # the CRS is still shown, for information


def test_one_other_organ_besides_the_liver_stays_oligometastatic():
    a = assess(*high_crs(*other_organs(BONE_MET_SNOMED)))
    assert a.recommendation == "consider-neoadjuvant-chemotherapy"
    assert a.extrahepatic_organs == ("bone",)


@pytest.mark.parametrize(
    "extra",
    [
        [condition(SNOMED, LYMPHANGITIC_SNOMED, onset="2021-01-10", body_site=LUNG_BODY_SITE, id="lymph")],
        [condition(ICD10CM, "C78.2", onset="2021-01-10", id="pleura")],
        other_organs(BONE_MET_SNOMED),  # the lung's extrapulmonary organs: liver + bone = 2
    ],
    ids=["lymphangitic", "pleural", "liver-and-bone"],
)
def test_lung_verdict_not_oligometastatic_makes_the_liver_card_systemic_therapy_first(extra):
    facts = derive_facts(chart(*high_crs(lung_met(onset="2019-09-09"), *extra)))
    lung = assess_lung(facts)
    liver = assess_liver(facts, lung)
    assert lung.recommendation == "systemic-therapy-first"
    assert liver.recommendation == "systemic-therapy-first"
    assert liver.reasons_not_oligometastatic == lung.reasons_not_oligometastatic


def test_lung_and_liver_only_is_oligometastatic_and_the_liver_card_follows_its_score():
    facts = derive_facts(chart(*high_crs(lung_met(onset="2019-09-09"))))
    lung = assess_lung(facts)
    assert lung.recommendation == "consider-nat"
    assert assess_liver(facts, lung).recommendation == "consider-neoadjuvant-chemotherapy"


# --- the liver card ---------------------------------------------------------------------------------------

CHARTS = {
    "consider-neoadjuvant-chemotherapy": high_crs(),
    "upfront-hepatectomy": low_crs(),
    "complete-risk-data": low_crs(
        n_category("pathologic", PN1), liver_met(onset="2019-09-09"), without=(*NO_LESIONS, "nodal", "liver")
    ),
    "systemic-therapy-first": high_crs(*other_organs(BONE_MET_SNOMED, PERITONEUM_MET_SNOMED)),
    "post-local-therapy-follow-up": high_crs(HEPATECTOMY),
}


@pytest.mark.parametrize("recommendation", LIVER_RECOMMENDATIONS)
def test_every_liver_recommendation_has_its_card(recommendation):
    c = card(*CHARTS[recommendation])
    a = assessment_json(c)
    assert a["model"] == "fong-crs-liver" and a["recommendation"] == recommendation
    assert c["indicator"] == ("warning" if recommendation == "consider-neoadjuvant-chemotherapy" else "info")
    assert len(c["summary"]) < 140
    assert "multidisciplinary team" in c["detail"]
    assert [f["id"] for f in a["factors"]] == list(FACTOR_IDS)
    for f in a["factors"]:
        assert None not in f.values()  # omitted when empty, never null (contract §4)
        assert ("reason" in f) == (f["status"] == UNKNOWN)
    assert card(*CHARTS[recommendation]) == c  # same chart, same card


def test_every_liver_recommendation_is_covered():
    assert set(CHARTS) == set(LIVER_RECOMMENDATIONS)
    assert {assessment_json(card(*r))["recommendation"] for r in CHARTS.values()} == set(
        LIVER_RECOMMENDATIONS
    )


@pytest.mark.parametrize(
    "resources",
    [
        # Every organ group besides the liver, no lung: the longest liver reason.
        high_crs(
            *other_organs(
                BONE_MET_SNOMED, BRAIN_MET_SNOMED, PERITONEUM_MET_SNOMED, "94161006", "94455000", "94392001"
            )
        ),
        # The lung verdict (its first reason is the one in the summary).
        high_crs(
            lung_met(onset="2019-09-09"),
            *other_organs(BONE_MET_SNOMED, BRAIN_MET_SNOMED, PERITONEUM_MET_SNOMED, "94161006"),
        ),
        # A score range.
        low_crs(without=(*NO_LESIONS, "nodal", "cea")),
    ],
    ids=["six-other-organs", "lung-verdict", "range"],
)
def test_summaries_stay_under_140_characters_with_long_reasons(resources):
    c = card(*resources)
    assert len(c["summary"]) < 140, c["summary"]


def test_extrahepatic_disease_line_beside_other_metastases():
    c = card(*high_crs(*other_organs(BONE_MET_SNOMED)))
    line = next(x for x in c["detail"].splitlines() if x.startswith("- Disease outside the liver"))
    assert "bone" in line and "liver-only disease" in line and "excluded metastases elsewhere" in line


def test_no_extrahepatic_line_for_liver_only_disease():
    c = card(*high_crs())
    assert "Disease outside the liver" not in c["detail"]
    assert "Lung and liver metastases" not in c["detail"]


def test_lung_and_liver_card_names_the_lung_and_points_to_the_lung_card():
    c = card(*high_crs(lung_met(onset="2019-09-09")))
    line = next(x for x in c["detail"].splitlines() if x.startswith("- Disease outside the liver"))
    assert "lung" in line and "liver-only disease" in line
    assert "- Lung metastases too: see the lung card." in c["detail"]


def test_lung_and_liver_card_names_the_lung_once():
    c = card(*high_crs(lung_met(onset="2019-09-09")))
    assert "- Disease outside the liver (lung):" in c["detail"]


@pytest.mark.parametrize(
    "site",
    [
        pytest.param(condition(ICD10CM, "C78.2", onset="2021-01-10"), id="pleura"),
        pytest.param(
            condition(SNOMED, MEDIASTINAL_NODES_SNOMED, onset="2021-01-10"),
            id="mediastinal-nodes",
        ),
    ],
)
def test_thoracic_disease_without_lung_metastases_gets_the_liver_only_caveat(site):
    c = card(*high_crs(site))
    assert "liver-only disease" in c["detail"]


def test_crs_0_to_2_wording_cites_esmo_2016_and_leaves_the_decision_to_the_mdt():
    c = card(*low_crs())
    assert (
        c["summary"]
        == "Liver metastases: clinical risk score 0/5 (low) – upfront hepatectomy is the usual option"
    )
    detail = c["detail"]
    assert "resection without preoperative chemotherapy is the usual option" in detail
    assert "(ESMO 2016)" in detail and assessment_json(c)["evidence"][0] == "esmo-2016-low-crs"
    assert "the MDT decides" in detail
    assert "the study held CRS 3–5 only" in detail
    assert "remains standard" not in detail  # the unsourced phrase of docs/clinical-rules.md §5
    assert ESMO_DOI in [link["url"] for link in c["links"]]
    assert "bevacizumab" not in detail.lower()  # the bevacizumab evidence is for CRS 3–5


def test_bevacizumab_is_evidence_with_its_limits_not_the_recommendation():
    c = card(*high_crs())
    a, detail = assessment_json(c), c["detail"]
    assert a["recommendation"] == "consider-neoadjuvant-chemotherapy"
    assert "consider neoadjuvant chemotherapy before hepatectomy" in c["summary"]
    # The key figure, the non-significant OS and the limits on the card; the rest on the evidence page.
    assert "3-year PFS 41.5% vs 27.6%, OS not significantly different" in detail
    assert "evidence, not a recommendation" in detail
    assert "retrospective six-centre cohort" in detail and "liver-only disease" in detail
    assert "chen-2025-bevacizumab" in a["evidence"]
    page = model_page("fong-crs-liver").html
    for shown in ("66.95%", "51.15%", "66.7% vs 57.0%", "≥ 5 weeks", "cetuximab", "New EPOC"):
        assert shown in page
    # Never the recommendation: not in the summary, not in any suggestion.
    assert "bevacizumab" not in c["summary"].lower()
    for suggestion in c["suggestions"]:
        assert "bevacizumab" not in json.dumps(suggestion).lower()
        for action in suggestion["actions"]:
            assert action["resource"]["resourceType"] == "ServiceRequest"


@pytest.mark.parametrize("recommendation", LIVER_RECOMMENDATIONS)
def test_bevacizumab_never_in_a_summary_or_a_recommendation(recommendation):
    c = card(*CHARTS[recommendation])
    assert "bevacizumab" not in c["summary"].lower()
    assert "bevacizumab" not in assessment_json(c)["recommendation"]


def test_complete_risk_data_card_names_what_is_missing():
    c = card(*CHARTS["complete-risk-data"])
    detail = c["detail"]
    assert (
        "- Next: obtain what is missing — More than one liver metastasis, Largest liver metastasis > 5 cm"
        in detail
    )
    assert "- If absent, score 2 — CRS 0–2: " in detail and "- If present, up to 4 — for CRS 3–5" in detail
    assert "liver MRI gives lesion count and size" in detail


def test_systemic_therapy_first_card_shows_the_crs_for_information():
    c = card(*CHARTS["systemic-therapy-first"])
    assert c["summary"] == (
        "Liver metastases, not oligometastatic (metastases in 2 organs besides the liver) – systemic therapy "
        "first, MDT review"
    )
    assert "the score is for information" in c["detail"].splitlines()[0]
    assert assessment_json(c)["score"] == {"min": 3, "max": 3}


def test_an_unreadable_tumor_record_still_counts_as_a_lesion_without_a_size():
    # Two Tumors at the liver; one not valid FHIR where the facts read it (a location's text must be
    # a string). Dropping it would read "one lesion, 3 cm": absent twice, and a low score the chart
    # does not support.
    broken = tumor(id="t2")
    broken["location"]["text"] = {"x": 1}
    a = assess(*low_crs(broken))
    assert factor(a, "multiple_liver_metastases").status == PRESENT
    assert factor(a, "largest_liver_metastasis_gt_5cm").status == UNKNOWN


# --- data the FHIR server would not give (docs/clinical-decisions.md) ------------------------------


def assess_unread(*resources, unread: frozenset[str]):
    c = chart(*resources)
    c.unread = unread
    facts = derive_facts(c)
    assessment = assess_liver(facts, assess_lung(facts))
    assert assessment is not None
    return assessment


def test_tumor_records_unread_leave_a_small_measured_size_unknown():
    # The size measured on the liver-metastasis Condition is 3 cm; read and empty, the Tumor records
    # hold no other lesion: absent. Unread, a lesion recorded only there may be larger or unmeasured.
    resources = low_crs(tumor_size(3.0, focus="Condition/liver-met", id="size-c"), without=NO_LESIONS)
    assert factor(assess(*resources), "largest_liver_metastasis_gt_5cm").status == ABSENT
    a = assess_unread(*resources, unread=frozenset({"BodyStructure"}))
    size = factor(a, "largest_liver_metastasis_gt_5cm")
    assert (size.status, size.value) == (UNKNOWN, "3.0 cm")
    assert "Tumor records (BodyStructure) could not be read" in (size.reason or "")
    count = factor(a, "multiple_liver_metastases")
    assert count.status == UNKNOWN and "could not be read" in (count.reason or "")
    # A lesion measured over 5 cm stays present: more lesions cannot make it smaller.
    big = low_crs(tumor_size(6.0, focus="Condition/liver-met", id="size-c"), without=NO_LESIONS)
    assert (
        factor(
            assess_unread(*big, unread=frozenset({"BodyStructure"})), "largest_liver_metastasis_gt_5cm"
        ).status
        == PRESENT
    )


def test_medications_unread_make_the_liver_cea_unknown_when_the_rule_could_pick_either_side():
    # Liver metastases 2021-01-10: CEA 250 on 2021-01-12, 40 on 2021-04-01 (after NAC, unseen).
    resources = low_crs(
        cea(250, date="2021-01-12", id="cea-250"), cea(40, date="2021-04-01", id="cea-40"), without=("cea",)
    )
    assert factor(assess(*resources), "cea_gt_200").status == ABSENT
    a = assess_unread(*resources, unread=frozenset({"Medication"}))  # a Medication read refused
    f = factor(a, "cea_gt_200")
    assert f.status == UNKNOWN and f.sources == ("Observation/cea-250", "Observation/cea-40")
    assert (a.score_min, a.score_max) == (0, 1)

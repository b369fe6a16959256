"""Only the elements the facts read are validated (clinical/facts/read_elements.py): an invalid
element the facts read still skips the resource, an invalid one they never read no longer does."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B.condition import Condition

from cds_service.clinical.facts import validation
from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.facts.model import PatientFacts
from cds_service.clinical.facts.read_elements import READ, READ_MODELS, field_names

from .builders import PATIENT_ID, chart, crc, lung_met, resection


@pytest.fixture(autouse=True)
def _fresh_outcomes():
    validation.OUTCOMES.clear()
    validation.ELEMENTS.clear()
    yield
    validation.OUTCOMES.clear()
    validation.ELEMENTS.clear()


def _with(resource: dict[str, Any], **elements: Any) -> dict[str, Any]:
    return {**resource, **elements}


@pytest.mark.parametrize(
    "unread",
    [
        {"meta": "x"},
        {"subject": 5},
        {"category": [{"coding": True}]},
        {"abatementDateTime": 20210101},
        {"note": [None]},
    ],
    ids=["meta", "subject", "category", "abatement", "note"],
)
def test_an_invalid_element_the_facts_never_read_no_longer_drops_the_resource(unread):
    facts = derive_facts(chart(crc(), _with(lung_met(), **unread)))
    assert facts.skipped == []
    assert [(m.source, m.organ) for m in facts.metastases] == [("Condition/lung-met", "lung")]


@pytest.mark.parametrize(
    "read",
    [
        {"clinicalStatus": {"coding": True}},
        {"verificationStatus": {"coding": [{"code": ["confirmed"]}]}},
        {"bodySite": [None]},
        {"onsetDateTime": 20210110},
        {"onsetDateTime": "not a date"},
        {"onsetString": "last spring"},  # a second onset[x]: only one is allowed
        {"id": "../x"},
    ],
    ids=[
        "clinicalStatus",
        "verificationStatus",
        "bodySite-null",
        "onset-number",
        "onset-no-date",
        "two-onsets",
        "id",
    ],
)
def test_an_invalid_element_the_facts_read_still_drops_the_resource(read, caplog):
    facts = derive_facts(chart(crc(), _with(lung_met(), **read)))
    assert facts.skipped and facts.skipped[0] in ("Condition/lung-met", "Condition")
    assert [m.organ for m in facts.metastases] == []
    # Named by field path only (a second onset[x] is a rule of the whole resource: no path), never
    # by a value of the chart.
    warning = next(r.getMessage() for r in caplog.records if "not valid FHIR" in r.getMessage())
    assert "onsetString" in read or next(iter(read)) in warning
    assert all(str(v) not in warning for v in read.values() if v not in (None, [None]))


def test_a_required_element_the_facts_read_is_still_required():
    facts = derive_facts(chart(crc(), lung_met(), {k: v for k, v in resection().items() if k != "status"}))
    assert facts.skipped == ["Procedure/resection"] and facts.resections == []


def test_a_required_element_the_facts_never_read_is_not():
    # Procedure.subject is 1..1 in FHIR; the facts never read it (the chart decided whose it is).
    facts = derive_facts(chart(crc(), lung_met(), {k: v for k, v in resection().items() if k != "subject"}))
    assert facts.skipped == [] and [p.source for p in facts.resections] == ["Procedure/resection"]


def test_the_read_model_holds_the_elements_read_and_no_other():
    condition = validation.validated(
        Condition, _with(lung_met(), meta={"versionId": "7"}), PatientFacts(PATIENT_ID)
    )
    assert condition is not None and condition.get_resource_type() == "Condition"
    assert condition.code.coding[0].code and condition.onsetDateTime.isoformat() == "2021-01-10"
    with pytest.raises(AttributeError):
        condition.meta  # noqa: B018 - not read, so not there: a fact reading it must list it first


@pytest.mark.parametrize("model", list(READ), ids=lambda m: m.__name__)
def test_each_read_model_is_its_fhir_resources_model_trimmed(model):
    read = READ_MODELS[model]
    for name in field_names(model, READ[model]):
        kept, whole = read.model_fields[name], model.model_fields[name]
        assert (kept.annotation, kept.alias, kept.is_required()) == (
            whole.annotation,
            whole.alias,
            whole.is_required(),
        )
    assert set(read.model_fields) == {"fhir_comments", *field_names(model, READ[model])}

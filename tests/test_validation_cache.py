"""Validation outcomes kept by content: a resource whose read elements were seen before is not
validated again, and what is accepted or refused stays what validating it again would give."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.condition import Condition

from cds_service.clinical.facts import validation
from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.facts.model import PatientFacts
from cds_service.clinical.facts.read_elements import READ_MODELS

from .builders import PATIENT_ID, chart, crc, lung_met


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every resource fhir.resources validates as a Condition (its elements read), from a cache
    emptied for the test."""
    validation.OUTCOMES.clear()
    validation.ELEMENTS.clear()
    yield _spy_on_validation(READ_MODELS[Condition], monkeypatch)
    validation.OUTCOMES.clear()
    validation.ELEMENTS.clear()


@pytest.fixture
def concepts(calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every CodeableConcept fhir.resources validates (as an element of a resource, or on its own)."""
    return _spy_on_validation(CodeableConcept, monkeypatch)


def _spy_on_validation(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What `model.model_validate` is given from now on, in order."""
    seen: list[Any] = []
    original = model.model_validate

    def spy(obj: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(obj)
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(model, "model_validate", spy)
    return seen


def _facts() -> PatientFacts:
    return PatientFacts(patient_id=PATIENT_ID)


def test_an_identical_resource_is_validated_once_and_read_the_same(calls):
    first = validation.validated(Condition, lung_met(), _facts())
    again = validation.validated(Condition, copy.deepcopy(lung_met()), _facts())
    assert len(calls) == 1
    assert again is first and first is not None and first.id == "lung-met"


def test_a_resource_that_differs_only_in_what_is_not_read_gets_the_kept_outcome(calls):
    # An EHR's new meta.versionId, or a new text narrative, changes nothing the facts read.
    first = validation.validated(Condition, lung_met(), _facts())
    changed = lung_met()
    changed["meta"] = {"versionId": "2"}
    changed["text"] = {"status": "generated", "div": "<div>lung</div>"}
    assert validation.validated(Condition, changed, _facts()) is first
    assert len(calls) == 1


def test_the_facts_of_a_chart_seen_again_are_the_same_without_validating_again(calls):
    def facts() -> PatientFacts:
        return derive_facts(chart(crc(), lung_met()))

    before = facts()
    validated_first_time = len(calls)
    assert validated_first_time == 2
    assert facts() == before
    assert len(calls) == validated_first_time


def test_a_resource_that_differs_in_one_value_is_validated_on_its_own(calls):
    validation.validated(Condition, lung_met(onset="2021-01-10"), _facts())
    later = validation.validated(Condition, lung_met(onset="2022-03-04"), _facts())
    assert len(calls) == 2 and later is not None
    assert later.onsetDateTime.isoformat().startswith("2022-03-04")


def test_an_invalid_resource_is_refused_and_named_every_time(calls, caplog):
    broken = lung_met()
    broken["clinicalStatus"] = {"coding": True}
    caplog.set_level(logging.WARNING, logger="cds_service.facts")
    for _ in range(2):
        facts = _facts()
        assert validation.validated(Condition, copy.deepcopy(broken), facts) is None
        assert facts.skipped == ["Condition/lung-met"]
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 2 and warnings[0] == warnings[1]
    assert "clinicalStatus" in warnings[0]


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), 10**30, "lone \ud800 surrogate"],
    ids=["nan", "infinity", "int-beyond-64-bits", "lone-surrogate"],
)
def test_what_the_key_cannot_tell_apart_is_never_kept(calls, value):
    # NaN and infinities would be written as null, like a null; the others cannot be written at all.
    resource = lung_met()
    resource["code"]["text"] = value
    for _ in range(2):
        validation.validated(Condition, copy.deepcopy(resource), _facts())
    assert len(calls) == 2
    assert len(validation.OUTCOMES) == 0


def test_a_large_resource_is_validated_every_time(calls):
    resource = lung_met()
    resource["code"]["text"] = "x" * 70_000
    for _ in range(2):
        assert validation.validated(Condition, copy.deepcopy(resource), _facts()) is not None
    assert len(calls) == 2


def test_the_cache_is_bounded_in_entries_and_bytes():
    outcomes = validation._outcomes(entries=3, json_bytes=100)
    for n in range(5):
        outcomes.put((Condition, json.dumps({"n": n}).encode()), object())
    assert len(outcomes) == 3
    assert outcomes.get((Condition, b'{"n": 0}')) is None
    assert outcomes.get((Condition, b'{"n": 4}')) is not None
    outcomes.put((Condition, b"x" * 95), object())
    assert len(outcomes) == 1  # the others went to stay within 100 bytes of JSON


def test_the_least_recently_used_goes_first():
    outcomes = validation._outcomes(entries=2, json_bytes=1000)
    kept = object()
    outcomes.put((Condition, b"a"), kept)
    outcomes.put((Condition, b"b"), object())
    assert outcomes.get((Condition, b"a")) is kept  # used: now the most recent
    outcomes.put((Condition, b"c"), object())
    assert outcomes.get((Condition, b"a")) is kept
    assert outcomes.get((Condition, b"b")) is None


def test_an_element_seen_in_another_resource_is_not_validated_again(concepts):
    # A new patient's Condition: another id and onset, the same code and statuses as charts before.
    first = validation.validated(Condition, lung_met(id="a"), _facts())
    assert len(concepts) == 3  # code, clinicalStatus, verificationStatus
    second = validation.validated(Condition, lung_met(id="b", onset="2022-05-06"), _facts())
    assert len(concepts) == 3
    assert first is not None and second is not None and second.id == "b"
    assert second.code is first.code and second.onsetDateTime.isoformat().startswith("2022-05-06")


def test_a_kept_element_does_not_let_an_invalid_one_beside_it_through(concepts, caplog):
    validation.validated(Condition, lung_met(id="a"), _facts())
    broken = lung_met(id="b")
    broken["verificationStatus"] = {"coding": [{"code": ["confirmed"]}]}
    caplog.set_level(logging.WARNING, logger="cds_service.facts")
    for _ in range(2):
        facts = _facts()
        assert validation.validated(Condition, copy.deepcopy(broken), facts) is None
        assert facts.skipped == ["Condition/b"]
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 2 and "verificationStatus.coding.0.code" in warnings[0]
    assert all(key[1] != orjson_text(broken["verificationStatus"]) for key in validation.ELEMENTS._kept)


def orjson_text(value: Any) -> bytes:
    key = validation._content_key(None, value)
    assert key is not None
    return key[1]

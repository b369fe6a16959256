"""Every demo patient: valid FHIR, and its hand-computed expected outcome through real HTTP."""

from __future__ import annotations

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from .conftest import SERVICE_URL, demo_files, expected, hook_body, load

IMPLEMENTED = {"lung", "liver"}


def _cases():
    exp = expected()
    for path in demo_files():
        case = exp[path.name]
        yield pytest.param(path, case, id=path.stem)


def test_expected_covers_every_demo_patient():
    assert sorted(expected()) == sorted(p.name for p in demo_files())
    assert len(demo_files()) >= 12


@pytest.mark.parametrize("path", demo_files(), ids=lambda p: p.stem)
def test_demo_bundle_is_valid_fhir_r4(path):
    doc = load(path)
    Bundle.model_validate(doc)
    for entry in doc["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


@pytest.mark.parametrize("path,case", list(_cases()))
def test_demo_patient_outcome(client, path, case):
    resp = client.post(SERVICE_URL, json=hook_body(load(path)))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    cards = resp.get_json()["cards"]
    want = case["expect"]
    if want.get("cards") == "none":
        assert cards == []
        return
    by_model = {c["extension"]["crc-cds-assessment"]["model"]: c for c in cards}
    for model, spec in want.items():
        if model not in IMPLEMENTED:
            continue
        name = {"lung": "cai-2025-lung", "liver": "fong-crs-liver"}[model]
        assert name in by_model, f"no {model} card; story: {case['story']}"
        card = by_model[name]
        assessment = card["extension"]["crc-cds-assessment"]
        assert assessment["recommendation"] == spec["recommendation"], case["story"]
        assert [assessment["score"]["min"], assessment["score"]["max"]] == spec["score"]
        assert assessment["group"] == spec["group"]
        statuses = {f["id"]: f["status"] for f in assessment["factors"]}
        want_statuses = {k: (v["status"] if isinstance(v, dict) else v) for k, v in spec["factors"].items()}
        assert statuses == want_statuses, case["story"]
        if "context" in spec:  # the context ids the card must show (docs/clinical-rules.md §8.27), in order
            assert [c["id"] for c in assessment.get("context", [])] == spec["context"], case["story"]
        if model == "lung":
            assert card["indicator"] == ("warning" if spec["recommendation"] == "consider-nat" else "info")
    assert len(cards) == sum(1 for m in want if m in IMPLEMENTED)

"""Charts that are valid JSON but odd or broken FHIR: an answer, never a 5xx, never a wrong card.

Each case is one mutation of demo patient 02 (colon cancer, right hemicolectomy 2018-06-04, pN0,
lung metastasis, CEA 7.2 ng/mL: cea_gt_5 present, consider-nat) found by fuzzing the service.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from .builders import medication_request
from .conftest import FIXTURES, SERVICE_URL, hook_body, load

BASE = FIXTURES / "02-lung-moderate-cea-only.json"
Chart = dict[str, Any]


def _resource(bundle: Chart, rid: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == rid)


def _cea(bundle: Chart) -> dict[str, Any]:
    return _resource(bundle, "d02-cea")


def _lung(resp) -> dict[str, Any]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    (card,) = resp.get_json()["cards"]
    return card["extension"]["crc-cds-assessment"]


def _factor(assessment: dict[str, Any], fid: str) -> dict[str, Any]:
    return next(f for f in assessment["factors"] if f["id"] == fid)


def _post(client, mutate: Callable[[Chart], Any]):
    bundle = load(BASE)
    mutate(bundle)
    return client.post(SERVICE_URL, json=hook_body(bundle))


# --- shapes the clinical core reads from raw JSON: a wrong type is "not read", not a crash ---------


def _set(path: str, value: Any) -> Callable[[Chart], None]:
    """Set a dotted path inside the CEA Observation."""

    def mutate(bundle: Chart) -> None:
        node = _cea(bundle)
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        _set("code.coding", 5),
        _set("code.coding.0.code", ["83085-1"]),
        _set("code.coding.0.system", {"url": "http://loinc.org"}),
        _set("status", ["final"]),
    ],
    ids=["coding-a-number", "code-a-list", "system-an-object", "status-a-list"],
)
def test_a_cea_whose_code_or_status_has_the_wrong_type_is_not_read(client, mutate):
    cea = _factor(_lung(_post(client, mutate)), "cea_gt_5")
    assert cea["status"] == "unknown"


@pytest.mark.parametrize(
    "mutate",
    [
        _set("valueQuantity.value", 10**400),  # beyond any float
        _set("valueQuantity.value", -1),
        _set("valueQuantity.value", "7.2"),
    ],
    ids=["beyond-float", "negative", "a-string"],
)
def test_a_cea_value_that_is_no_concentration_is_unreadable(client, mutate):
    cea = _factor(_lung(_post(client, mutate)), "cea_gt_5")
    assert cea["status"] == "unknown" and "not a numeric result" in cea["reason"]


@pytest.mark.parametrize(
    "mutate",
    [_set("valueQuantity.comparator", ["<"]), _set("valueQuantity.system", ["x"]), _set("id", "../../x")],
    ids=["comparator-a-list", "system-a-list", "id-no-fhir-id"],
)
def test_a_cea_that_is_not_valid_fhir_is_named_and_not_used(client, mutate):
    a = _lung(_post(client, mutate))
    cea = _factor(a, "cea_gt_5")
    assert cea["status"] == "unknown" and "not valid FHIR" in cea["reason"]
    assert all("../" not in s for f in a["factors"] for s in f.get("sources", []))


def test_a_lone_surrogate_in_chart_text_reaches_the_card_as_valid_json(client):
    resp = _post(client, _set("id", "cea\ud800"))
    assert resp.status_code == 200
    json.loads(resp.get_data())  # bytes that are UTF-8 and JSON


# --- dates: strings only, and no arithmetic overflow -----------------------------------------------


def test_a_date_written_as_a_number_is_not_read_as_seconds_since_1970(client):
    def mutate(bundle: Chart) -> None:
        _resource(bundle, "d02-resection")["performedDateTime"] = 20180604

    a = _lung(_post(client, mutate))
    dfi = _factor(a, "dfi_lt_24m")
    # The resection is not valid FHIR, so skipped and named: no DFI of 611 months from 1970.
    assert dfi["status"] == "unknown"


def test_a_primary_diagnosed_in_year_one_does_not_overflow(client):
    def mutate(bundle: Chart) -> None:
        _resource(bundle, "d02-crc")["onsetDateTime"] = "0001-01-01"

    assert _post(client, mutate).status_code == 200


@pytest.mark.parametrize("value", ["unknown", "false", {"x": 1}])
def test_a_deceased_date_that_is_no_date_does_not_hide_the_cards(client, value):
    def mutate(bundle: Chart) -> None:
        _resource(bundle, "demo-d02")["deceasedDateTime"] = value

    assert _lung(_post(client, mutate))["recommendation"] == "consider-nat"


# --- medication resources ------------------------------------------------------------------------


def _on_oxaliplatin(**fields: Any) -> Callable[[Chart], None]:
    def mutate(bundle: Chart) -> None:
        order = medication_request(authored="2021-03-01", id="d02-order", subject="Patient/demo-d02")
        order["medicationCodeableConcept"] = {"text": "oxaliplatin"}
        order.update(fields)
        bundle["entry"].append({"resource": order})

    return mutate


@pytest.mark.parametrize(
    "fields",
    [
        {"status": ["active"]},
        {"medicationCodeableConcept": {"coding": 5}},
        {"medicationReference": {"reference": "#m"}, "contained": 5},
        {"medicationReference": {"reference": "#m"}, "contained": [{"resourceType": "", "id": "m"}]},
    ],
    ids=["status-a-list", "coding-a-number", "contained-a-number", "contained-of-no-type"],
)
def test_an_odd_medication_order_gets_an_answer(client, fields):
    assert _lung(_post(client, _on_oxaliplatin(**fields)))["model"] == "cai-2025-lung"


def test_a_medication_with_a_list_id_is_not_looked_up(client):
    def mutate(bundle: Chart) -> None:
        _on_oxaliplatin(medicationReference={"reference": "Medication/m"})(bundle)
        bundle["entry"].append({"resource": {"resourceType": "Medication", "id": ["m"]}})

    assert _post(client, mutate).status_code == 200


# --- the request body itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"[" * 5000 + b"]" * 5000, b'{"hook": ' + b"9" * 5000 + b"}"],
    ids=["nested-5000-deep", "integer-of-5000-digits"],
)
def test_json_the_parser_cannot_hold_is_a_400(client, body):
    resp = client.post(SERVICE_URL, data=body, content_type="application/json")
    assert resp.status_code == 400 and resp.get_json()["resourceType"] == "OperationOutcome"


def test_a_next_page_with_odd_entries_is_merged_without_a_crash(client, httpserver: HTTPServer):
    page2 = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "search": "x",
                "resource": {"resourceType": "Procedure", "id": {"odd": 1}, "status": "completed"},
            }
        ],
    }
    httpserver.expect_request("/fhir/page2").respond_with_json(page2)
    body = hook_body(load(BASE))
    body["fhirServer"] = httpserver.url_for("/fhir")
    body["prefetch"]["procedures"]["link"] = [{"relation": "next", "url": httpserver.url_for("/fhir/page2")}]
    assert _lung(client.post(SERVICE_URL, json=body))["recommendation"] == "consider-nat"


# --- a resource the clinical core recognises but cannot validate ----------------------------------


def test_an_unreadable_metastasis_makes_the_extrapulmonary_factor_unknown_not_absent(client):
    def mutate(bundle: Chart) -> None:
        bundle["entry"].append(
            {
                "resource": {
                    "resourceType": "Condition",
                    "id": "d02-adrenal",
                    "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "C79.7"}]},
                    "subject": {"reference": "Patient/demo-d02"},
                    "clinicalStatus": {"coding": True},  # not valid FHIR
                }
            }
        )

    a = _lung(_post(client, mutate))
    extrapulmonary = _factor(a, "extrapulmonary_metastases")
    assert extrapulmonary["status"] == "unknown" and "not valid FHIR" in extrapulmonary["reason"]
    assert extrapulmonary["sources"] == ["Condition/d02-adrenal"]


def test_an_unreadable_drug_order_still_keeps_on_treatment_cea_out(client):
    def mutate(bundle: Chart) -> None:
        _on_oxaliplatin(dosageInstruction="daily")(bundle)  # not valid FHIR: a string for a list
        later = json.loads(json.dumps(_cea(bundle)))
        later.update(id="d02-cea-later", effectiveDateTime="2021-06-01")
        later["valueQuantity"]["value"] = 2.0
        bundle["entry"].append({"resource": later})

    cea = _factor(_lung(_post(client, mutate)), "cea_gt_5")
    # An order of unknown start: only a CEA from before the metastasis is surely not on treatment.
    assert cea["status"] != "absent"


def test_a_factor_whose_conditions_have_no_id_cites_the_patient(client):
    # Every factor cites a Type/id (contract §4, README): with nothing else citable, the patient.
    def mutate(bundle: Chart) -> None:
        del _resource(bundle, "d02-lungmet")["id"]

    a = _lung(_post(client, mutate))
    assert all(f.get("sources") for f in a["factors"])
    # "none outside the lung" was assessed for the lung metastasis, which has no id to cite.
    assert _factor(a, "extrapulmonary_metastases")["sources"] == ["Patient/demo-d02"]

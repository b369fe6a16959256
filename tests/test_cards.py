"""Card content rules (docs/clinical-rules.md §7): summaries, evidence links, FHIR suggestions, safety."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from fhir.resources.R4B.servicerequest import ServiceRequest

from cds_service.clinical.facts.derive import derive_facts
from cds_service.clinical.scoring.lung import assess_lung
from cds_service.render import cards as render
from cds_service.render.cards import lung_card as render_lung_card
from cds_service.render.detail_view import ref
from cds_service.render.markdown import md
from cds_service.web.app import create_app

from .builders import BONE_MET_SNOMED, BRAIN_MET_SNOMED, ICD10CM, LIVER_MET_SNOMED, SNOMED, chart, condition
from .conftest import FIXTURES, SERVICE_URL, demo_files, hook_body, load, lung_card
from .test_lung_model import low_risk

CAI_DOI = "https://doi.org/10.1007/s00384-025-04986-8"
MODEL_DOI = {"cai-2025-lung": CAI_DOI, "fong-crs-liver": "https://doi.org/10.1177/17588359251328457"}


def _cards(client, path):
    resp = client.post(SERVICE_URL, json=hook_body(load(path), hook_instance="fixed-instance"))
    assert resp.status_code == 200
    return resp.get_json()["cards"]


@pytest.mark.parametrize("path", demo_files(), ids=lambda p: p.stem)
def test_every_card_follows_the_card_rules(client, path):
    for card in _cards(client, path):
        assert len(card["summary"]) < 140
        assert "MDT" in card["detail"] or "multidisciplinary" in card["detail"]
        for factor in card["extension"]["crc-cds-assessment"]["factors"]:
            # Every factor cites Type/id resources, even one resting on an absence (contract §4).
            assert factor["sources"] and all(
                re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}", s) for s in factor["sources"]
            ), factor
        doi = MODEL_DOI[card["extension"]["crc-cds-assessment"]["model"]]
        assert any(link["url"] == doi for link in card["links"])
        assert card["source"]["url"] == doi
        for suggestion in card["suggestions"]:
            for action in suggestion["actions"]:
                assert action["type"] == "create"
                ServiceRequest.model_validate(action["resource"])
        # Same chart, same call: same cards, same order, same words.
        assert _cards(client, path) == _cards(client, path)


def test_factor_table_shows_value_date_and_source(client):
    card = lung_card(_cards(client, FIXTURES / "02-lung-moderate-cea-only.json"))
    cea = next(f for f in card["extension"]["crc-cds-assessment"]["factors"] if f["id"] == "cea_gt_5")
    assert cea["value"] == "12.4 ng/mL" and cea["date"] and cea["sources"]
    row = next(line for line in card["detail"].splitlines() if line.startswith("| Serum CEA"))
    # The date with non-breaking hyphens: it never wraps in a narrow EHR panel.
    assert "12.4 ng/mL" in row and cea["date"].replace("-", "\u2011") in row and ref(cea["sources"][0]) in row


def test_missing_cea_suggests_ordering_one(client):
    card = lung_card(_cards(client, FIXTURES / "04-lung-cea-missing.json"))
    labels = [s["label"] for s in card["suggestions"]]
    assert "Order serum CEA" in labels
    cea_request = next(s for s in card["suggestions"] if s["label"] == "Order serum CEA")["actions"][0][
        "resource"
    ]
    assert cea_request["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "2039-6",
        "display": "Carcinoembryonic Ag [Mass/volume] in Serum or Plasma",
    }
    unknown = next(f for f in card["extension"]["crc-cds-assessment"]["factors"] if f["id"] == "cea_gt_5")
    assert unknown["status"] == "unknown" and unknown["reason"]


def test_known_cea_does_not_suggest_a_new_one_when_recent(client):
    card = lung_card(_cards(client, FIXTURES / "01-lung-high-risk-all-four.json"))
    labels = [s["label"] for s in card["suggestions"]]
    assert "Order serum CEA" not in labels or "days old" in card["detail"]


def test_stale_cea_is_flagged(app, settings):
    from cds_service.web.app import create_app

    later = create_app(settings, today=lambda: __import__("datetime").date(2030, 1, 1)).test_client()
    card = lung_card(
        later.post(SERVICE_URL, json=hook_body(load(FIXTURES / "02-lung-moderate-cea-only.json"))).get_json()[
            "cards"
        ]
    )
    assert "days old" in card["detail"]
    assert "Order serum CEA" in [s["label"] for s in card["suggestions"]]


def test_consider_nat_card_states_the_conflict_and_limits(client):
    card = lung_card(_cards(client, FIXTURES / "02-lung-moderate-cea-only.json"))  # metachronous, isolated
    assert card["indicator"] == "warning"
    assert (
        "Conflicting view" in card["detail"]
        and "Chinese expert consensus, limited evidence" in card["detail"]
    )
    assert "single-centre" in card["detail"]
    assert "≤ 5 metastatic lesions" in card["detail"]
    assert "RECIST 1.1" in card["detail"]


def test_hostile_chart_text_cannot_inject_html_or_links(client):
    card = lung_card(_cards(client, FIXTURES / "21-lung-hostile-text.json"))
    text = card["detail"] + card["summary"]
    assert "<script" not in text and "<img" not in text
    assert not re.search(r"(?<!\\)\[[^\]]*\]\(", text), "an unescaped Markdown link reached the card"
    assert "http://evil" not in text


@pytest.mark.parametrize(
    "raw,safe",
    [
        ("<script>alert(1)</script>", r"\<script\>alert(1)\</script\>"),
        ("[click](http://evil.example)", r"\[click\](http\://evil.example)"),
        ("a | b\nc", r"a \| b c"),
        ("www.evil.example", r"www\.evil.example"),
    ],
)
def test_md_escapes_chart_text(raw, safe):
    assert md(raw) == safe


def _hostile_chart_with(resource: dict) -> dict:
    """The hostile-text demo chart with one more resource of its patient's."""
    bundle = load(FIXTURES / "21-lung-hostile-text.json")
    patient_id = next(
        e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    bundle["entry"].append({"resource": {**resource, "subject": {"reference": f"Patient/{patient_id}"}}})
    return bundle


def test_hostile_text_that_reaches_the_card_is_escaped(client):
    """Chart text the card does show (a unit it cannot read) arrives inert."""
    unreadable_unit = {
        "resourceType": "Observation",
        "id": "hostile-unit",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2039-6"}]},
        "effectiveDateTime": "2023-01-02",
        "valueQuantity": {"value": 9, "unit": "<img src=x onerror=alert(1)>[x](http://evil.example)"},
    }
    resp = client.post(SERVICE_URL, json=hook_body(_hostile_chart_with(unreadable_unit)))
    card = lung_card(resp.get_json()["cards"])
    assert "not used (" in card["detail"]
    assert not re.search(r"(?<!\\)<img", card["detail"]), "raw HTML reached the card"
    assert not re.search(r"(?<!\\)\[[^\]]*(?<!\\)\]\(", card["detail"]), (
        "a live Markdown link reached the card"
    )
    assert r"\<img src=x onerror=alert(1)\>" in card["detail"]


# --- the Li 2019 consensus's staged treatment: lung and liver, or lung and one other site -----------------------


def _detail(*extra):
    facts = derive_facts(chart(*low_risk(*extra)))
    assessment = assess_lung(facts)
    assert assessment is not None
    card = render_lung_card(
        assessment, facts, hook_instance="h", today=dt.date(2024, 1, 1), cea_max_age_days=90
    )
    return card.detail


def test_one_non_liver_site_gets_the_staged_treatment_line_with_its_name():
    detail = _detail(condition(ICD10CM, "C77.2", onset="2022-05-01", id="nodes"))
    assert (
        "- Lung and distant lymph nodes: the consensus treats one other site like the liver: if both are curable, staged radical treatment"
        in detail
    )
    assert "liver first" not in detail


def test_two_other_sites_get_no_staged_treatment_and_a_liver_site_gets_it():
    two = _detail(
        condition(SNOMED, BONE_MET_SNOMED, id="bone"), condition(SNOMED, BRAIN_MET_SNOMED, id="brain")
    )
    assert "staged radical treatment" not in two
    # Two organs besides the lung, no lymphangitic spread: the lymphangitic wording is not the reason.
    assert "systemic therapy is the mainstay" in two and "lymphangitic" not in two.lower()
    liver = _detail(condition(SNOMED, LIVER_MET_SNOMED, id="liver"))
    assert "- Lung and liver: if both are curable, staged radical treatment" in liver


def test_the_app_loads_card_templates_before_its_first_call(settings):
    render._detail_template.cache_clear()
    render._summary_template.cache_clear()
    create_app(settings)
    # Both detail templates and every summary are compiled: `serve` loads them once in the master.
    assert render._detail_template.cache_info().currsize == 2
    assert render._summary_template.cache_info().currsize >= 10


def test_a_chemotherapy_procedures_own_text_reaches_the_card_inert(client):
    """The drug shown for a chemotherapy Procedure is the chart's own code text."""
    chemo = {
        "resourceType": "Procedure",
        "id": "hostile-chemo",
        "status": "completed",
        "code": {
            "coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "96413"}],
            "text": "FOLFOX [click](http://evil.example) <img src=x> **bold**",
        },
        "performedDateTime": "2030-01-01",
    }
    resp = client.post(SERVICE_URL, json=hook_body(_hostile_chart_with(chemo)))
    detail = lung_card(resp.get_json()["cards"])["detail"]
    assert "FOLFOX" in detail
    assert not re.search(r"(?<!\\)<img", detail), "raw HTML reached the card"
    assert not re.search(r"(?<!\\)\[[^\]]*(?<!\\)\]\(", detail), "a live Markdown link reached the card"
    assert "**bold**" not in detail


def test_a_sentence_continued_after_a_colon_keeps_its_acronym():
    from cds_service.render.markdown import lower_first

    assert lower_first("Assess response by RECIST 1.1") == "assess response by RECIST 1.1"
    assert lower_first("CRS 3–5 marks a higher risk") == "CRS 3–5 marks a higher risk"
    assert lower_first("NAT was linked") == "NAT was linked"
    assert lower_first("") == ""

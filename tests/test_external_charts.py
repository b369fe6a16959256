"""Real public FHIR R4 charts nobody on the team wrote: read without error, no cards.

Read in place from ../shared/fhir-external (never copied into the project).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from .conftest import SERVICE_URL, SHARED, hook_body

EXTERNAL = SHARED / "fhir-external"


def _charts() -> list[Path]:
    if not EXTERNAL.is_dir():
        return []
    return sorted(
        p for p in EXTERNAL.rglob("*") if p.name.endswith((".json", ".json.gz")) and p.name != "expect.json"
    )


def _read(path: Path) -> dict:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)


pytestmark = pytest.mark.skipif(
    not EXTERNAL.is_dir(), reason=f"{EXTERNAL} is absent (shared/ not beside the checkout)"
)


def test_every_listed_chart_is_present():
    expect = json.loads((EXTERNAL / "expect.json").read_text())
    names = {str(p.relative_to(EXTERNAL)) for p in _charts()}
    assert set(expect) <= names


@pytest.mark.parametrize("path", _charts(), ids=lambda p: p.name.split("_")[0][:40])
def test_external_chart_gets_no_cards(client, path):
    bundle = _read(path)
    if not any(e.get("resource", {}).get("resourceType") == "Patient" for e in bundle.get("entry", [])):
        # Format samples without a Patient: still evaluated, for a made-up patient id.
        bundle = {
            **bundle,
            "entry": [*bundle.get("entry", []), {"resource": {"resourceType": "Patient", "id": "sample"}}],
        }
    resp = client.post(SERVICE_URL, json=hook_body(bundle))
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    assert resp.get_json() == {"cards": []}


def _crc_charts() -> list[Path]:
    return [p for p in _charts() if "/crc/" in str(p)]


@pytest.mark.parametrize("path", _crc_charts(), ids=lambda p: p.name.split("_")[0][:40])
def test_real_crc_chart_with_an_added_lung_metastasis_is_read_through(client, path):
    """The whole pipeline on real Synthea data: a lung metastasis added one year after diagnosis."""
    bundle = _read(path)
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient.pop("deceasedDateTime", None)
    patient.pop("deceasedBoolean", None)
    bundle["entry"].append(
        {
            "resource": {
                "resourceType": "Condition",
                "id": "added-lungmet",
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "94391008"}]},
                "subject": {"reference": f"Patient/{patient['id']}"},
                "onsetDateTime": "2021-06-01",
            }
        }
    )
    resp = client.post(SERVICE_URL, json=hook_body(bundle))
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    (card,) = resp.get_json()["cards"]
    factors = {f["id"]: f for f in card["extension"]["crc-cds-assessment"]["factors"]}
    # Synthea never emits CEA or TNM data (docs/terminology.md §6): those stay unknown, with reasons.
    assert factors["cea_gt_5"]["status"] == "unknown" and factors["cea_gt_5"]["reason"]
    assert factors["node_positive_primary"]["status"] == "unknown"
    dfi = factors["dfi_lt_24m"]
    if dfi["status"] != "unknown":
        assert any(s.startswith("Procedure/") for s in dfi["sources"])

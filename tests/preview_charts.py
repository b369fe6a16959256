"""Charts for the preview page's tests: a hostile chart whose text does reach the card's detail."""

from __future__ import annotations

import copy
import json
from typing import Any

from .conftest import FIXTURES, load

HOSTILE_PATIENT = "demo-h21"
# Shown in the card ("Not used: CEA 9 <unit> …"): an unreadable CEA unit is quoted from the chart.
HOSTILE_UNIT = "<img src=x onerror=alert(7)> [x](javascript:alert(8)) <script>alert(9)</script>"


def hostile_bundle() -> dict[str, Any]:
    """Fixture 21 (hostile free text) under new ids, plus a CEA whose unit is hostile.

    Fixture 21's own hostile text never reaches its card (the card quotes ids, not displays); this
    CEA's unit does, so the page's Markdown rendering is tried on chart text for real.
    """
    text = json.dumps(load(FIXTURES / "21-lung-hostile-text.json"))
    bundle = json.loads(
        text.replace("demo-d21", HOSTILE_PATIENT).replace('"d21-', '"h21-').replace("/d21-", "/h21-")
    )
    cea = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == "h21-cea")
    extra = copy.deepcopy(cea)
    extra["id"] = "h21-cea-hostile"
    extra["effectiveDateTime"] = "2022-08-10"  # after the readable one: the latest, so it is reported
    extra["valueQuantity"] = {"value": 9, "unit": HOSTILE_UNIT, "code": "<b>u</b>"}
    bundle["entry"].append({"resource": extra})
    return bundle

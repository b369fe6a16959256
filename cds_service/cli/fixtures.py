"""The demo patients of fixtures/fhir/: read for `demo`, and (soon) exported and loaded into a FHIR server."""

from __future__ import annotations

import json
from typing import Any


def demo_resources() -> list[dict[str, Any]]:
    """The demo patients' resources, as the fixture files hold them."""
    from cds_service.paths import data_dir

    resources: list[dict[str, Any]] = []
    for path in sorted(data_dir("fixtures").glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("resourceType") == "Bundle":
            resources.extend(
                e["resource"] for e in doc.get("entry", []) if isinstance(e.get("resource"), dict)
            )
    return resources

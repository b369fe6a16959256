"""Only render/ knows the card JSON: the request path and the web pages go through it."""

from __future__ import annotations

import re
from pathlib import Path

import cds_service

PACKAGE = Path(cds_service.__file__).parent
# What reading a card's JSON looks like: its extension key, or a card field looked up by name.
CARD_JSON = re.compile(r"crc-cds-assessment|\[\"cards\"\]|\.get\(\"(?:cards|detail|summary|extension)\"")


def test_the_request_path_and_the_web_pages_never_read_card_json():
    files = [PACKAGE / "pipeline.py", *sorted((PACKAGE / "web").glob("*.py"))]
    offenders = [
        f"{p.relative_to(PACKAGE)}: {m.group(0)}" for p in files for m in CARD_JSON.finditer(p.read_text())
    ]
    assert not offenders, offenders

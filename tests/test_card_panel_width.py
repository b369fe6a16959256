"""Every demo card's detail as an EHR side panel shows it: Debian's Chromium, 340 px of text (a 380 px
panel less its padding), the browser's default styles and none of ours.

The CDS Hooks sandbox and EHRs render the detail Markdown as a plain HTML table sized to its content
and cut off what is wider than the card: a three-column factor table was 380 px wide in a 318 px
card there, and its dates read "2026-11-2". So the card must fit by itself, whatever the ids of the
EHR (Epic's are 40+ characters without a hyphen), and no date may wrap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cds_service.render.detail_view import ZWSP, ref
from cds_service.render.markdown import render_markdown

from .conftest import SERVICE_URL, TODAY, demo_files, hook_body, load

CHROMIUM = Path("/usr/bin/chromium")
PANEL_PX = 340
# An id as Epic's FHIR API writes them: long, dotted, no hyphen a line could break at.
EPIC_ID = "fSMC.Mc4KaIHnzbyDw4MFo9C1yIVi9YtYpKEpcTnwYg3"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium is absent: run scripts/install-test-deps.sh"
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
)


def test_a_reference_may_break_after_its_slash_and_inside_a_long_id_and_reads_the_same():
    shown = ref(f"Observation/{EPIC_ID}")
    assert shown.replace(ZWSP, "") == f"Observation/{EPIC_ID}"
    runs = re.split(rf"[{ZWSP}\-\s]", shown)
    assert max(len(r) for r in runs) <= 16, runs
    assert ref("Condition/d01-lungmet") == f"Condition/{ZWSP}d01-lungmet"  # short ids are left whole
    # A resource type is a word, never split: "MedicationReques t" would read as a typo.
    assert ref("MedicationAdministration/x1") == f"MedicationAdministration/{ZWSP}x1"
    # Still inert Markdown: chart text cannot become a link or emphasis, split or not.
    assert ref("Condition/[x](https://evil.example)_*").replace(ZWSP, "") == (
        "Condition/\\[x\\](https\\://evil.example)\\_\\*"
    )


def _with_long_ids(bundle: dict[str, Any]) -> dict[str, Any]:
    """The chart with every id made Epic-like (references follow: the same text is replaced)."""
    text = json.dumps(bundle)
    ids = {e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] != "Patient"}
    for n, old in enumerate(sorted(ids, key=len, reverse=True)):
        text = re.sub(rf'(?<=["/]){re.escape(old)}(?=")', f"{EPIC_ID}{n:02d}", text)
    return json.loads(text)


@pytest.fixture(scope="module")
def details(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    from cds_service.settings import Settings
    from cds_service.web.app import create_app

    db = tmp_path_factory.mktemp("panel") / "s.db"
    client = create_app(
        Settings(auth_required=False, database_url=f"sqlite:///{db}"), today=lambda: TODAY
    ).test_client()
    out = []
    for path in demo_files():
        bundle = load(path)
        for tag, chart in (("", bundle), (" (Epic-like ids)", _with_long_ids(bundle))):
            resp = client.post(SERVICE_URL, json=hook_body(chart, hook_instance="panel"))
            assert resp.status_code == 200, resp.get_data(as_text=True)
            out += [(path.name + tag, card["detail"]) for card in resp.get_json()["cards"]]
    assert any("Epic" in name for name, _ in out)
    return out


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"]
        )
        yield browser.new_page(viewport={"width": 400, "height": 800})
        browser.close()


# For each ISO date (non-breaking hyphens) in the panel: on how many lines it is drawn.
_DATE_LINES = """panel => {
  const walker = document.createTreeWalker(panel, NodeFilter.SHOW_TEXT); const out = [];
  for (let node; (node = walker.nextNode());) {
    for (const m of node.data.matchAll(/\\d{4}\\u2011\\d{2}\\u2011\\d{2}/g)) {
      const r = document.createRange(); r.setStart(node, m.index); r.setEnd(node, m.index + m[0].length);
      const tops = new Set([...r.getClientRects()].map(c => Math.round(c.top)));
      out.push([m[0], tops.size]);
    }
  }
  return out;
}"""


def test_every_card_fits_a_side_panel_with_default_styles_and_no_date_wraps(details, page):
    assert len(details) > 60
    for name, detail in details:
        page.set_content(
            f'<!doctype html><meta charset="utf-8"><div id="panel" style="width:{PANEL_PX}px">'
            f"{render_markdown(detail)}</div>"
        )
        panel = page.locator("#panel")
        widths = panel.evaluate(
            "p => ({panel: p.scrollWidth, table: p.querySelector('table').getBoundingClientRect().width})"
        )
        assert widths["panel"] <= PANEL_PX and widths["table"] <= PANEL_PX, (name, widths)
        dates = panel.evaluate(_DATE_LINES)
        assert dates and all(lines == 1 for _date, lines in dates), (name, dates)

"""The preview page in a real browser: Debian's Chromium driven by Playwright.

The app (demo resources, preview on) runs on a loopback port in a thread, as `cds-service demo` does;
the page reads the demo patients from the app's own /fhir, so each card here went through the whole
path: form → hook route → FHIR fetch over HTTP → engine → cards → HTML → browser. Screenshots are
saved under test-artifacts/ (gitignored). `scripts/install-test-deps.sh` installs chromium.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from werkzeug.serving import make_server

from cds_service.cli.fixtures import demo_resources
from cds_service.settings import Settings
from cds_service.web.app import create_app

from .conftest import ROOT, TODAY, demo_files, expected, load
from .preview_charts import HOSTILE_PATIENT, HOSTILE_UNIT, hostile_bundle

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
# Offline and quiet: no update checks, sync or first-run pages; --no-sandbox because tests may run as root.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INDICATOR_COLOURS = {
    "info": "rgb(31, 111, 178)",
    "warning": "rgb(199, 119, 0)",
    "critical": "rgb(179, 38, 30)",
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="/usr/bin/chromium is absent: run `bash scripts/install-test-deps.sh` (Debian)",
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    database = tmp_path_factory.mktemp("preview") / "store.db"
    settings = Settings(
        auth_required=False, preview=True, database_url=f"sqlite:///{database}", fhir_timeout_s=5
    )
    app = create_app(settings, today=lambda: TODAY, demo_resources=[*demo_resources(), hostile_bundle()])
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", app
    httpd.shutdown()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that records any dialog (alert) and script error instead of hanging on it."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.dialogs = []
    page.errors = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.set_default_timeout(15_000)
    yield page
    context.close()


def _show(page: Any, base: str, patient_id: str) -> None:
    page.goto(base + "/")
    page.click(f"button.patient[value='{patient_id}']")
    page.wait_for_selector(".call-line")


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"preview-{name}.png"), full_page=True)


def _indicators() -> dict[str, dict[str, str]]:
    """model → recommendation → indicator, from the card wording files (what the card must show)."""
    out: dict[str, dict[str, str]] = {}
    for path in (ROOT / "cards").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(spec, dict) and "model" in spec:
            out[spec["model"]] = {k: v["indicator"] for k, v in spec["recommendations"].items()}
    return out


_MODELS = {"lung": "cai-2025-lung", "liver": "fong-crs-liver"}


def _patient_id(path: Path) -> str:
    return next(
        e["resource"]["id"] for e in load(path)["entry"] if e["resource"]["resourceType"] == "Patient"
    )


@pytest.mark.parametrize("path", demo_files(), ids=lambda p: p.stem)
def test_every_demo_patient_shows_its_expected_cards(server, page, path):
    base, _app = server
    expect = expected()[path.name]["expect"]
    _show(page, base, _patient_id(path))
    _shot(page, path.stem)
    assert page.locator(".http-status").text_content() == "200"
    shown = json.loads(page.locator(".response-json pre").text_content())  # the answer the page rendered
    cards = page.locator("article.card")
    if expect.get("cards") == "none":
        assert cards.count() == 0 and shown == {"cards": []}
        assert page.locator(".no-cards").is_visible()
        return
    assert cards.count() == len(expect) == len(shown["cards"])
    indicators = _indicators()
    for i, answer_card in enumerate(shown["cards"]):
        card = cards.nth(i)
        model = answer_card["extension"]["crc-cds-assessment"]["model"]
        want = expect[next(k for k, m in _MODELS.items() if m == model)]
        indicator = indicators[model][want["recommendation"]]
        assert card.get_attribute("data-model") == model
        assert f"indicator-{indicator}" in card.get_attribute("class").split()
        # The stylesheet loaded under the CSP: the bar has the indicator's colour.
        assert card.evaluate("e => getComputedStyle(e).borderLeftColor") == INDICATOR_COLOURS[indicator]
        assert card.locator(".summary").text_content() == answer_card["summary"]
        assert card.locator(".summary").is_visible()
        assert card.locator(".recommendation").text_content() == want["recommendation"]
        assert card.locator(".group").text_content() == want["group"]
        lo, hi = want["score"]
        assert card.locator(".score").text_content() == (str(lo) if lo == hi else f"{lo}–{hi}")
        for factor, status in want["factors"].items():
            assert card.locator(f"tr[data-factor='{factor}'] td.status").text_content() == status, factor
        # The detail's Markdown table is rendered as a table, and the source links out.
        assert card.locator(".detail table").count() >= 1
        assert card.locator(".source a").get_attribute("href") == answer_card["source"]["url"]
        assert card.locator("button.suggestion").count() == len(answer_card["suggestions"])
        assert card.locator("select.override-reason option").count() == 1 + len(
            answer_card["overrideReasons"]
        )
    assert page.dialogs == [] and page.errors == []


def _store_counts(app: Any) -> dict[str, int]:
    return app.extensions["cds.store"].counts()


def test_accept_and_override_post_real_feedback(server, page):
    base, app = server
    _show(page, base, "demo-d14")  # lung + liver: one card accepted, the other overridden
    lung, liver = page.locator("article.card").nth(0), page.locator("article.card").nth(1)
    before = _store_counts(app)

    suggestion = lung.locator("button.suggestion").first
    suggestion_id = suggestion.get_attribute("data-suggestion")
    suggestion.click()
    status = lung.locator(".feedback-status")
    sync_api.expect(status).to_have_attribute("data-state", "ok")
    assert "feedback stored (HTTP 200)" in status.text_content()
    sent = json.loads(lung.locator(".feedback-json").text_content())
    assert sent["feedback"][0]["card"] == lung.get_attribute("data-card")
    assert sent["feedback"][0]["outcome"] == "accepted"
    assert sent["feedback"][0]["acceptedSuggestions"] == [{"id": suggestion_id}]
    assert lung.get_attribute("data-outcome") == "accepted"

    liver.locator("select.override-reason").select_option(index=1)
    liver.locator(".override-comment").fill("Discussed at the MDT <b>last week</b>")
    liver.locator("button.dismiss").click()
    status = liver.locator(".feedback-status")
    sync_api.expect(status).to_have_attribute("data-state", "ok")
    sent = json.loads(liver.locator(".feedback-json").text_content())["feedback"][0]
    assert sent["outcome"] == "overridden" and "acceptedSuggestions" not in sent
    assert sent["overrideReason"]["reason"]["system"] == "urn:crc-cds:override-reason"
    assert sent["overrideReason"]["reason"]["code"]
    assert sent["overrideReason"]["userComment"] == "Discussed at the MDT <b>last week</b>"
    _shot(page, "feedback")

    after = _store_counts(app)
    feedback_table = next(t for t in after if "feedback" in t)
    assert after[feedback_table] == before[feedback_table] + 2
    assert page.dialogs == [] and page.errors == []


def test_taking_one_suggestion_leaves_the_other_and_the_override_usable(server, page):
    """CDS Hooks lets a user take several suggestions and still override: only the taken one is spent."""
    base, _app = server
    _show(page, base, "demo-d04")  # no CEA: the card suggests an MDT review and a CEA order
    card = page.locator("article.card").first
    mdt, cea = card.locator("button.suggestion").nth(0), card.locator("button.suggestion").nth(1)
    mdt.click()
    sync_api.expect(card.locator(".feedback-status")).to_have_attribute("data-state", "ok")
    assert mdt.is_disabled() and mdt.get_attribute("data-taken") == "true"
    assert cea.is_enabled() and card.locator("button.dismiss").is_enabled()
    cea.click()
    sync_api.expect(cea).to_have_attribute("data-taken", "true")
    sent = json.loads(card.locator(".feedback-json").text_content())["feedback"][0]
    assert sent["acceptedSuggestions"] == [{"id": cea.get_attribute("data-suggestion")}]
    assert card.locator("button.dismiss").is_enabled()


def test_narrow_panel_shows_the_card_first_and_its_evidence_one_click_away(server, browser):
    """At 360 px (a phone, or the narrowest EHR panel) the card comes before the patient list, fits
    the width, and its evidence page opens from one link: HTML without script, holding its ids."""
    base, _app = server
    context = browser.new_context(viewport={"width": 360, "height": 800})
    page = context.new_page()
    _show(page, base, "demo-d14")
    card = page.locator("article.card").first
    assert card.bounding_box()["y"] < page.locator("aside.pick").bounding_box()["y"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # nothing wider than the screen
    table = card.locator(".detail table")
    assert table.bounding_box()["x"] + table.bounding_box()["width"] <= 360
    for finding in card.locator(".detail td:nth-child(2)").all_text_contents():
        assert not re.search(r"\d{4}-\d{2}-\d{2}", finding)  # non-breaking hyphens: a date never wraps
    # The assessment (with the same factors) is folded away: the factor table is shown once.
    assert not card.locator("details.assessment").evaluate("d => d.open")
    link = card.locator("li.evidence-page a")
    href = link.get_attribute("href")
    assert href == base + "/evidence/cai-2025-lung"
    evidence = context.new_page()
    evidence.goto(href)
    assert evidence.locator("script").count() == 0
    ids = json.loads(page.locator(".response-json pre").text_content())["cards"][0]["extension"][
        "crc-cds-assessment"
    ]["evidence"]
    for statement in ids:
        assert evidence.locator(f"section#{statement}").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "preview-360.png"), full_page=True)
    evidence.screenshot(path=str(ARTIFACTS / "evidence-360.png"))
    context.close()


def test_a_chosen_patient_far_down_the_list_is_scrolled_into_view(server, page):
    base, _app = server
    _show(page, base, "demo-d33")
    chosen = page.locator("button.patient.chosen")
    assert chosen.get_attribute("value") == "demo-d33"
    in_view = chosen.evaluate(
        "b => { const l = b.closest('.patients').getBoundingClientRect(), r = b.getBoundingClientRect();"
        " return r.top >= l.top && r.bottom <= l.bottom; }"
    )
    assert in_view
    assert page.errors == []


def test_refused_feedback_is_shown(server, page):
    base, _app = server
    _show(page, base, "demo-d03")
    card = page.locator("article.card").first
    # A card uuid the service never returned: the endpoint refuses (422) and the page says why.
    card.evaluate("e => { e.dataset.card = '00000000-0000-4000-8000-000000000000'; }")
    card.locator("button.dismiss").click()
    status = card.locator(".feedback-status")
    sync_api.expect(status).to_have_attribute("data-state", "error")
    assert "HTTP 422" in status.text_content() and "unknown card uuid" in status.text_content()


@pytest.mark.parametrize("patient_id", ["demo-d21", HOSTILE_PATIENT])
def test_hostile_chart_cannot_inject_script(server, page, patient_id):
    base, _app = server
    _show(page, base, patient_id)
    page.locator("details.response-json").evaluate("e => { e.open = true; }")
    _shot(page, f"hostile-{patient_id}")
    assert page.locator("article.card").count() == 1
    assert page.dialogs == [], page.dialogs
    assert page.errors == []
    scripts = page.locator("script")
    assert scripts.count() == 1 and scripts.first.get_attribute("src").endswith("/preview.js")
    assert page.locator("img").count() == 0
    assert page.locator("[onerror], [onclick], [onload]").count() == 0
    assert page.locator("a[href^='javascript'], a[href*='evil.example']").count() == 0
    if patient_id == HOSTILE_PATIENT:  # its CEA unit reaches the card: shown as the text it is
        detail = page.locator("article.card .detail").inner_text()
        assert HOSTILE_UNIT in detail
    else:  # fixture 21's own hostile text is in its story, shown beside the card
        assert "<script>alert(1)</script>" in page.locator(".chart-story").inner_text()


def test_fhir_server_form(server, page):
    base, _app = server
    page.goto(base + "/")
    page.fill("input[name=fhir_server]", base + "/fhir")
    page.fill("input[name=patient_id]", "demo-d15")
    page.fill("input[name=token]", "t0ken-not-to-be-shown")
    page.click("button.run")
    page.wait_for_selector(".call-line")
    assert page.locator("article.card").count() == 1
    assert page.locator("article.card").get_attribute("data-model") == "fong-crs-liver"
    assert "t0ken-not-to-be-shown" not in page.content()
    request = json.loads(page.locator(".request-json pre").text_content())
    assert request["fhirAuthorization"]["access_token"] == "(hidden)"
    assert "prefetch" not in request
    elapsed = page.locator(".elapsed").text_content()
    assert elapsed.endswith(" ms") and float(elapsed.split()[0]) >= 0
    _shot(page, "fhir-server")


def test_the_readme_demo_command_serves_the_page():
    """The real `cds-service demo` (gunicorn, where the page reads /fhir through the socket it listens on),
    driven by scripts/preview_screenshot.py: the script that makes the README's docs/preview.png."""
    out = ARTIFACTS / "preview-demo-command.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "preview_screenshot.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 card(s) for demo-d01" in run.stdout
    assert out.stat().st_size > 10_000

"""The preview page at / through the Flask test client (no browser): when it is on, what it escapes.

The demo patients are read over real HTTP: a werkzeug server on a loopback port serves their FHIR
resources, and the page is told (through the socket address, as a real server would) to read there.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from flask import Flask
from markupsafe import escape
from werkzeug.serving import make_server

from cds_service.cli.fixtures import demo_resources
from cds_service.render.markdown import render_markdown
from cds_service.render.views import card_view
from cds_service.settings import Settings
from cds_service.web.app import create_app
from cds_service.web.demo_fhir import create_fhir_blueprint
from cds_service.web.preview import CSP, own_fhir_base

from .conftest import FIXTURES, TODAY, expected
from .preview_charts import HOSTILE_PATIENT, HOSTILE_UNIT, hostile_bundle


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    return [*demo_resources(), hostile_bundle()]


@pytest.fixture(scope="module")
def fhir_port(resources: list[dict]) -> Iterator[int]:
    """The demo FHIR endpoint on a loopback port: where `demo` itself would be listening."""
    app = Flask("fhir")
    app.register_blueprint(create_fhir_blueprint(resources))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()


@pytest.fixture
def demo_client(tmp_path: Path, resources: list[dict]):
    settings = Settings(
        auth_required=False, preview=True, database_url=f"sqlite:///{tmp_path / 'p.db'}", fhir_timeout_s=3
    )
    return create_app(settings, today=lambda: TODAY, demo_resources=resources).test_client()


def _run_demo(client, port: int, patient: str):
    # The socket address the page reads its own /fhir through (SERVER_NAME/PORT, as gunicorn sets them).
    return client.post(
        "/",
        data={"source": "demo", "patient": patient},
        environ_overrides={"SERVER_NAME": "127.0.0.1", "SERVER_PORT": str(port)},
    )


def test_off_in_serve_mode_by_default(client):
    assert client.get("/").status_code == 404
    assert client.post("/", data={"source": "demo"}).status_code == 404
    assert client.get("/preview-static/preview.js").status_code == 404


def test_on_in_serve_mode_with_cds_preview_true(monkeypatch, tmp_path):
    monkeypatch.setenv("CDS_PREVIEW", "true")
    monkeypatch.setenv("CDS_DATABASE_URL", f"sqlite:///{tmp_path / 's.db'}")
    client = create_app(Settings()).test_client()
    page = client.get("/")
    assert page.status_code == 200
    assert page.content_type == "text/html; charset=utf-8"
    assert page.headers["Content-Security-Policy"] == CSP
    assert page.headers["X-Frame-Options"] == "DENY"
    text = page.get_data(as_text=True)
    assert 'name="fhir_server"' in text
    assert 'name="patient"' not in text  # no demo patients outside `demo`
    assert client.get("/preview-static/preview.js").status_code == 200
    assert client.get("/preview-static/preview.css").status_code == 200


def test_demo_list_shows_every_demo_patient_with_its_story_escaped(demo_client):
    text = demo_client.get("/").get_data(as_text=True)
    plain = yaml.safe_load((FIXTURES / "patients.yaml").read_text(encoding="utf-8"))
    assert sorted(plain) == sorted(expected())  # every demo patient has a title and a plain story
    for name, entry in plain.items():
        # A title a clinician recognises (not the file name), and the story in plain words, as text.
        assert f"{name[:2]}. {escape(entry['title'])}" in text, name
        assert str(escape(entry["story"])) in text, name
        # The demo moves every chart's dates to lately: a calendar year in a story would contradict the card.
        assert not re.search(r"\b(19|20)\d\d\b", entry["story"] + entry["title"]), name
        assert (
            name.removesuffix(".json") not in text
            and name.removesuffix(".json").replace("-", " ") not in text
        )
    assert text.count('name="patient"') == len(plain) + 1  # + the hostile chart of these tests
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # fixture 21's story, as text


def test_demo_patient_cards_are_rendered(demo_client, fhir_port):
    page = _run_demo(demo_client, fhir_port, "demo-d01")
    text = page.get_data(as_text=True)
    assert page.status_code == 200, text
    assert 'HTTP <span class="http-status">200</span>' in text
    assert 'class="card indicator-warning"' in text
    assert "Lung metastases: high recurrence risk (4/4 factors)" in text
    assert re.search(
        r'data-factor="cea_gt_5">\s*<td>Serum CEA &gt; 5.0 ng/mL</td><td class="status">present', text
    )
    assert (
        str(escape(f'"fhirServer": "http://127.0.0.1:{fhir_port}/fhir"')) in text
    )  # request JSON: the demo's own /fhir
    assert "&#34;prefetch&#34;" not in text


def test_hostile_chart_is_shown_as_text(demo_client, fhir_port):
    text = _run_demo(demo_client, fhir_port, HOSTILE_PATIENT).get_data(as_text=True)
    assert 'class="card indicator-warning"' in text
    detail = re.search(r'<div class="detail">(.*?)</div>', text, re.S).group(1)
    # Every piece of the hostile unit is in the detail, escaped (md() first, then markdown-it).
    for piece in (
        "&lt;img src=x onerror=alert(7)&gt;",
        "[x](javascript:alert(8))",
        "&lt;script&gt;alert(9)&lt;/script&gt;",
    ):
        assert piece in detail, piece
    assert "<script>alert" not in text and "<img" not in text and 'javascript:alert(8)"' not in text
    assert 'href="javascript' not in text
    assert text.count("<script") == 1  # the page's own preview.js
    assert str(escape(HOSTILE_UNIT)) in text  # the response JSON, escaped in <pre>


def test_fhir_server_form_hides_the_token_and_shows_refusals(demo_client, fhir_port):
    page = demo_client.post(
        "/",
        data={
            "source": "fhir",
            "fhir_server": f"http://127.0.0.1:{fhir_port}/fhir",
            "patient_id": "demo-d03",
            "token": "s3cret-token-value",
        },
    )
    text = page.get_data(as_text=True)
    assert "Lung metastases: low recurrence risk (0/4 factors)" in text
    assert "s3cret-token-value" not in text and str(escape('"access_token": "(hidden)"')) in text
    # The hook's own FHIR safety rules: plain http to a non-loopback host is refused before any connection.
    refused = demo_client.post(
        "/", data={"source": "fhir", "fhir_server": "http://fhir.example.invalid/r4", "patient_id": "p1"}
    ).get_data(as_text=True)
    assert 'HTTP <span class="http-status">412</span>' in refused
    assert "uses plain http" in refused


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"source": "demo", "patient": "nobody"}, "Choose one of the demo patients"),
        (
            {"source": "fhir", "fhir_server": "https://x.example/r4", "patient_id": "a/b"},
            "patient&#39;s FHIR id",
        ),
        ({"source": "fhir", "fhir_server": "", "patient_id": "p"}, "FHIR server&#39;s base URL"),
    ],
)
def test_bad_form_input_is_a_400_page(demo_client, form, message):
    page = demo_client.post("/", data=form)
    assert page.status_code == 400
    assert message in page.get_data(as_text=True)


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}],
    ids=["origin", "fetch-site"],
)
def test_cross_site_posts_are_refused(demo_client, headers):
    # Another site must not make this service call FHIR servers through a visitor's browser.
    assert (
        demo_client.post("/", data={"source": "demo", "patient": "demo-d01"}, headers=headers).status_code
        == 403
    )


def test_same_origin_post_is_accepted(demo_client):
    page = demo_client.post(
        "/",
        data={"source": "demo", "patient": "nobody"},
        headers={"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"},
    )
    assert page.status_code == 400  # past the origin check, refused for the unknown patient


def test_markdown_is_rendered_with_raw_html_off():
    out = str(
        render_markdown(
            "**b** <script>alert(1)</script> <b onclick=x>t</b> [l](javascript:alert(1)) "
            "[ok](https://doi.org/x)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
        )
    )
    assert "<strong>b</strong>" in out and "<table>" in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out and "&lt;b onclick=x&gt;" in out
    assert 'href="javascript' not in out and "<script" not in out
    assert '<a href="https://doi.org/x" target="_blank" rel="noopener noreferrer">ok</a>' in out


def test_card_view_keeps_class_names_and_links_safe():
    view = card_view(
        {
            "uuid": "u",
            "summary": "s",
            "detail": "d",
            "indicator": 'info" onclick="x',
            "source": {"label": "src", "url": "javascript:alert(1)"},
            "links": [{"label": "l", "url": "data:text/html,x", "type": "absolute"}],
            "extension": {
                "crc-cds-assessment": {
                    "model": "m",
                    "score": {"min": 0, "max": 1},
                    "factors": [{"id": "f", "status": "x y"}],
                }
            },
        }
    )
    assert view.indicator == "info"
    assert view.source is not None and view.source.url is None
    assert view.links[0].url is None
    assert view.assessment is not None and view.assessment.score == "0–1"
    assert view.assessment.factors[0].status_class == "other"


@pytest.mark.parametrize(
    ("server_name", "port", "base"),
    [
        ("127.0.0.1", "8080", "http://127.0.0.1:8080/fhir"),
        ("0.0.0.0", "8080", "http://127.0.0.1:8080/fhir"),
        ("::", "9000", "http://[::1]:9000/fhir"),
        ("::1", "9000", "http://[::1]:9000/fhir"),
    ],
)
def test_own_fhir_base_is_where_the_server_listens(server_name, port, base):
    assert own_fhir_base({"SERVER_NAME": server_name, "SERVER_PORT": port}) == base

"""The evidence pages: `GET /evidence` and `GET /evidence/<model>` as server-rendered HTML, Flask-free.

Everything a card no longer says — cohorts, figures, limits, conflicting views, supporting evidence,
the product decisions — with each statement under its id, in the same words the cards quote (one
source: cards/evidence.yaml). No script at all; the only style is the page's own, allowed by hash.
Readable on a phone (one column) and printable (links print their DOI).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2

from cds_service.paths import data_dir
from cds_service.render.evidence import decisions, models, papers, statements, wordings

_TEMPLATE = "evidence_page.html.j2"
_STYLE = """
body{font:16px/1.5 system-ui,"DejaVu Sans",sans-serif;color:#1b1f24;margin:0;background:#fff}
main{max-width:46rem;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;margin:.2rem 0 .6rem}h2{font-size:1.15rem;margin:1.6rem 0 .4rem;border-bottom:1px solid #d5d9de}
h3{font-size:1rem;margin:1rem 0 .2rem}code{font:0.9em ui-monospace,"DejaVu Sans Mono",monospace;background:#f2f4f6;padding:0 .2em}
.statement{border-left:4px solid #1f6fb2;padding:.1rem 0 .1rem .7rem;margin:.8rem 0}
.statement p{margin:.25rem 0}.more,.where,.source,.kind{color:#3d4550;font-size:.95rem}
.variant{font-style:italic}nav a{margin-right:1rem}a{color:#1f6fb2;overflow-wrap:anywhere}
@media print{nav{display:none}a[href^="https://doi.org/"]::after{content:" <" attr(href) ">";font-size:.85em}
.statement{break-inside:avoid}main{max-width:none}}
""".strip()
# A CSP that allows this one stylesheet and nothing else: no script, no fetch, no frames, no forms.
CSP = (
    "default-src 'none'; style-src 'sha256-"
    + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
    + "'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Page:
    status: int
    html: str


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("cards"))),
        undefined=jinja2.StrictUndefined,
        autoescape=True,  # HTML: every value from the catalogue is text
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _statement(statement_id: str) -> dict[str, Any]:
    s = statements()[statement_id]
    paper = papers()[s["paper"]]
    texts = wordings(s)
    return {
        "id": statement_id,
        "text": texts[0],
        "variants": texts[1:],
        "more": s.get("more", ""),
        "where": s.get("where", ""),
        "paper": paper,
    }


def _model(model: str) -> dict[str, Any]:
    spec = models()[model]
    sections = [
        {"heading": section["heading"], "statements": [_statement(i) for i in section["ids"]]}
        for section in spec["sections"]
    ]
    used = {st["paper"]["label"]: st["paper"] for sec in sections for st in sec["statements"]}
    used.pop(papers()["product"]["label"], None)
    return {
        "id": model,
        "title": spec["title"],
        "about": spec["about"],
        "paper": papers()[spec["paper"]],
        "sections": sections,
        "papers": list(used.values()),
        "decisions": decisions(model),
    }


def _render(model: str | None, missing: str | None, base_path: str) -> str:
    everything = [_model(m) for m in models()] if model is None else []
    return (
        _environment()
        .get_template(_TEMPLATE)
        .render(
            style=_STYLE,
            base_path=base_path,
            model=_model(model) if model else None,
            models=everything,
            missing=missing,
        )
    )


def index_page(base_path: str = "/evidence") -> Page:
    """The list of the service's models, each linking its page."""
    return Page(200, _render(None, None, base_path))


def model_page(model: str, base_path: str = "/evidence") -> Page:
    """One model's page; an unknown model gets the list, with a 404."""
    if model not in models():
        return Page(404, _render(None, model, base_path))
    return Page(200, _render(model, None, base_path))

"""The evidence catalogue of cards/evidence.yaml: papers, statements by id, and how a card cites them.

A card template quotes a statement with `say(id)`: the statement's own words followed by an invisible
marker. `cite()` turns the markers of a rendered card into short citations — the first one of a paper
on the card says what kind of evidence it is, e.g. "Li 2019: Chinese expert consensus, limited
evidence" — and returns the ids in the order the card shows them. So the ids an assessment lists are
exactly the statements its card shows, and the page at /evidence/<model> shows the same words.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import yaml

from cds_service.paths import data_dir

# Chart text never holds these: md() splits on whitespace, and Python counts \x1e and \x1f as whitespace.
_OPEN, _CLOSE = "\x1e", "\x1f"
_MARKER = re.compile("\x1e([^\x1e\x1f]+)\x1f")
# The wordings a statement may have; `card` is the usual one.
_TEXT_KEYS = ("card", "dfi0", "alternative", "lymphangitic", "other_site", "also")


@cache
def catalogue() -> dict[str, Any]:
    return yaml.safe_load((data_dir("cards") / "evidence.yaml").read_text(encoding="utf-8"))


def papers() -> dict[str, Any]:
    return catalogue()["papers"]


def statements() -> dict[str, Any]:
    return catalogue()["statements"]


def models() -> dict[str, Any]:
    return catalogue()["models"]


def decisions(model: str) -> list[str]:
    return list(catalogue()["decisions"].get(model, ()))


def wordings(statement: dict[str, Any]) -> list[str]:
    """Every wording of a statement a card may show, the usual one first."""
    return [statement[k] for k in _TEXT_KEYS if k in statement]


def say(statement_id: str, wording: str = "card") -> str:
    """A statement's words for a card template, marked so that cite() can name and list it."""
    text = statements()[statement_id][wording]  # KeyError: a template quotes an id that does not exist
    return f"{text}{_OPEN}{statement_id}{_CLOSE}"


def cite(markdown: str) -> tuple[str, list[str]]:
    """The card with each marker replaced by its citation, and the statement ids in order of appearance."""
    ids: list[str] = []
    cited: set[str] = set()

    def citation(match: re.Match[str]) -> str:
        statement_id = match.group(1)
        if statement_id not in ids:
            ids.append(statement_id)
        paper_key = statements()[statement_id]["paper"]
        paper = papers()[paper_key]
        first = paper_key not in cited
        cited.add(paper_key)
        return f" ({paper.get('cite_first', paper['cite']) if first else paper['cite']})"

    return _MARKER.sub(citation, markdown), ids


def paper_of(statement_id: str) -> dict[str, Any]:
    return papers()[statements()[statement_id]["paper"]]

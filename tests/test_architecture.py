"""The layering docs/architecture.md promises, checked on the source: an `ast` walk of every module.

- `clinical/` is the pure core: no web, HTTP, SQL or template library, and nothing of the package
  outside itself but `paths`.
- Only `web/` imports Flask (and Werkzeug), only `fetch/` speaks HTTP to FHIR servers (requests),
  only `store/` speaks SQL (SQLAlchemy, Alembic), only `render/` knows the card templates (Jinja2).
- No module is over 450 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cds_service"
MAX_LINES = 450

# Third-party top-level packages → the only folder (relative to cds_service/) allowed to import them.
OWNED = {
    "flask": "web",
    "werkzeug": "web",
    "requests": "fetch",
    "urllib3": "fetch",
    "sqlalchemy": "store",
    "alembic": "store",
    "jinja2": "render",
}
CLINICAL_MAY_IMPORT = ("cds_service.clinical", "cds_service.paths")

# Boundary breaches still being removed, each with the module that breaches. Empty this, never grow it.
PENDING: set[tuple[str, str]] = set()
PENDING_LONG: set[str] = set()  # modules still over the limit; empty this, never grow it


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute, at any depth (function-level imports count too)."""
    found: set[str] = set()
    package = ".".join(("cds_service", *path.relative_to(PACKAGE).parent.parts))
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return found


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _breaches() -> set[tuple[str, str]]:
    breaches: set[tuple[str, str]] = set()
    for path in _modules():
        name = _name(path)
        folder = name.split("/")[0] if "/" in name else ""
        for imported in _imports(path):
            top = imported.split(".")[0]
            owner = OWNED.get(top)
            if owner is not None and folder != owner:
                breaches.add((name, top))
            if folder == "clinical" and top == "cds_service" and not imported.startswith(CLINICAL_MAY_IMPORT):
                breaches.add((name, imported))
    return breaches


def test_every_layer_imports_only_what_its_boundary_allows():
    unexpected = _breaches() - PENDING
    assert not unexpected, f"imports across a layer boundary: {sorted(unexpected)}"


def test_pending_breaches_are_still_real():
    """A breach that has been removed must leave the PENDING list, so the list only shrinks."""
    gone = PENDING - _breaches()
    assert not gone, f"remove from PENDING: {sorted(gone)}"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_module_is_over_450_lines(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if _name(path) in PENDING_LONG:
        assert lines > MAX_LINES, f"{_name(path)} is now short enough: remove it from PENDING_LONG"
    else:
        assert lines <= MAX_LINES, f"{_name(path)} has {lines} lines; split it along its seams"


def test_the_clinical_core_is_importable_without_flask_requests_or_sqlalchemy():
    """The same rule, at run time: importing the core loads none of the I/O libraries."""
    import subprocess
    import sys

    code = (
        "import sys; import cds_service.clinical.facts.derive, cds_service.clinical.scoring.lung, "
        "cds_service.clinical.scoring.liver; "
        "print(sorted(m for m in ('flask', 'requests', 'sqlalchemy', 'jinja2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_liver_model_does_not_import_the_lung_model():
    """The liver pathway takes the lung verdict as plain data: the two models stay independent."""
    imported = _imports(PACKAGE / "clinical" / "scoring" / "liver.py")
    assert not [m for m in imported if m.startswith("cds_service.clinical.scoring.lung")]

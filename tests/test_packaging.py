"""`pip install .` (not editable) ships the data folders: what a user of the README gets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import FIXTURES, ROOT

pytestmark = pytest.mark.slow  # a real `pip install` into a folder


def test_installed_package_finds_its_mappings_cards_and_demo_patients(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    for folder in ("mappings", "cards", "fixtures"):
        assert any((target / "cds_service" / folder).iterdir()), folder
    for asset in ("templates/preview.html", "static/preview.js", "static/preview.css"):  # the preview page
        assert (target / "cds_service" / "web" / "preview_ui" / asset).is_file(), asset
    assert (target / "cds_service" / "py.typed").is_file()  # type checkers read the installed hints
    source = ROOT / "cds_service"
    for init in source.rglob("__init__.py"):  # every subpackage is listed in pyproject.toml
        assert (target / init.relative_to(ROOT)).is_file(), init.relative_to(ROOT)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cds_service; "
        "assert cds_service.__file__.startswith(sys.argv[1]), cds_service.__file__; "
        "from cds_service.cli.main import main; sys.exit(main(['evaluate', sys.argv[2]]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(target), str(FIXTURES / "01-lung-high-risk-all-four.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"cai-2025-lung"' in run.stdout

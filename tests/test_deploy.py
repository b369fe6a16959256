"""What production runs: the tested dependency versions, the systemd unit, the container image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from .conftest import ROOT


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"not pinned: {line}"
            pins[_canonical(name)] = version.strip()
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [_canonical(re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0]) for req in project["dependencies"]]


def test_every_runtime_dependency_is_pinned_at_the_version_the_tests_run_with():
    pins = _pins()
    for name in _runtime_requirements():
        assert name in pins, f"{name} is missing from constraints.txt (scripts/freeze-constraints.sh)"
        installed = metadata.version(name)
        assert installed == pins[name], (
            f"{name}: tests run with {installed}, constraints.txt pins {pins[name]}: "
            "install with -c constraints.txt, or regenerate it (scripts/freeze-constraints.sh)"
        )
    assert "crc-cds-service" not in pins


def test_the_image_ci_and_the_production_install_use_the_constraints():
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^COPY .*constraints\.txt", dockerfile, re.M)
    assert re.search(r"^RUN pip install -c constraints\.txt \.", dockerfile, re.M)
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -c constraints.txt" in (ROOT / "README.md").read_text(encoding="utf-8")


UNIT = ROOT / "deploy" / "cds-service.service"


def _unit_settings() -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in UNIT.read_text(encoding="utf-8").splitlines()
        if re.match(r"^\w+=", line)
    )


def test_the_systemd_unit_supervises_the_whole_process_group():
    unit = _unit_settings()
    assert unit["ExecStart"].endswith("cds-service serve --host 127.0.0.1 --port 8080")
    assert unit["Restart"] == "always" and unit["KillMode"] == "control-group"
    assert unit["Type"] == "notify"  # gunicorn tells systemd when it is ready
    assert unit["User"] != "root" and unit["NoNewPrivileges"] == "yes"
    assert int(unit["TimeoutStopSec"]) > 30  # above gunicorn's graceful timeout
    assert unit["RestartPreventExitStatus"] == "2"  # a configuration error is not retried in a loop


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path: Path):
    # verify needs ExecStart to exist: point it at this checkout's console script.
    script = Path(sys.executable).with_name("cds-service")
    unit = tmp_path / "cds-service.service"
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/opt/cds-service/bin/cds-service", str(script)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    complaints = [line for line in done.stderr.splitlines() if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stderr

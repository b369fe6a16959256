"""Shared fixtures: the app under real HTTP semantics (Flask test client), demo charts, shared/."""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from cds_service.cli.commands import request_from_bundle
from cds_service.settings import Settings
from cds_service.store.audit import close_all
from cds_service.store.database import close_stores
from cds_service.web.app import create_app

from .postgres import PostgresCluster, server_binaries, start_cluster

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "fhir"
SHARED = ROOT.parent / "shared"
SERVICE_URL = "/cds-services/crc-metastases"
# Demo charts are dated 2017-2023; a fixed "today" keeps staleness wording reproducible.
TODAY = dt.date(2024, 1, 15)


def demo_files() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if p.name != "expected.json")


def expected() -> dict[str, Any]:
    return json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def _database_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Apps built from default Settings() must not write cds-service.db into the checkout."""
    monkeypatch.setenv("CDS_DATABASE_URL", f"sqlite:///{tmp_path / 'default.db'}")
    # PostgreSQL's default audit spool is in the working directory: keep it in the test's folder.
    monkeypatch.setenv("CDS_AUDIT_SPOOL_DIR", str(tmp_path / "audit-spool"))
    yield
    close_all()  # no audit writer outlives its test's database


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(auth_required=False, database_url=f"sqlite:///{tmp_path / 'cds.db'}", fhir_timeout_s=3)


@pytest.fixture
def app(settings: Settings):
    app = create_app(settings, today=lambda: TODAY)
    app.config["TESTING"] = False  # errors must go through the real handlers
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def hook_body(bundle: dict[str, Any], hook_instance: str | None = None) -> dict[str, Any]:
    """A full-prefetch patient-view request for a chart, as an EHR would send it."""
    body = request_from_bundle(copy.deepcopy(bundle))
    body["hookInstance"] = hook_instance or str(uuid.uuid4())
    body["context"]["userId"] = "Practitioner/test"
    return body


def lung_card(cards: list[dict[str, Any]]) -> dict[str, Any]:
    found = [c for c in cards if c["extension"]["crc-cds-assessment"]["model"] == "cai-2025-lung"]
    assert len(found) == 1, f"expected one lung card, got {len(found)}"
    return found[0]


# --- the store's databases: every store test runs on SQLite and on a real PostgreSQL server -------


@pytest.fixture(scope="module")
def fhir_server() -> Iterator[HTTPServer]:
    """One threaded FHIR endpoint per test module (threaded: concurrent searches must be answered at once)."""
    srv = HTTPServer(host="127.0.0.1", threaded=True)
    srv.start()
    yield srv
    srv.clear()
    srv.stop()


@pytest.fixture
def fhir(fhir_server: HTTPServer) -> Iterator[HTTPServer]:
    """The module's FHIR endpoint with no expectations left from another test (a module may override)."""
    fhir_server.clear()
    yield fhir_server
    fhir_server.clear()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    cluster = start_cluster(bin_dir)  # binaries present but no server: a failure, not a skip
    yield cluster
    close_stores()
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        yield request.getfixturevalue("postgres").new_database()
    close_all()  # audit records still queued are written to this test's database, not a later one
    close_stores()  # no pooled connection outlives its test (PostgreSQL counts them)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every PostgreSQL case is slow (a real server); the rest carry `@pytest.mark.slow` themselves."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if "postgres" in getattr(item, "fixturenames", ()) or (
            callspec is not None and "postgresql" in callspec.params.values()
        ):
            item.add_marker(pytest.mark.slow)

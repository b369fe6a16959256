"""The audit trail under `cds-service serve`, attacked the way an SRE would: a worker SIGKILLed while
its records cannot reach the database, PostgreSQL stopped and started again under load, and feedback
posted to one instance for the cards another instance is answering under load.

Every call answered 200 must end up in the database, and every feedback post answered 200 too.
The outage here lasts a few seconds (the service holds records for as long as its disk allows; a
minute-long outage differs only in the spool's size).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from .conftest import FIXTURES, SERVICE_URL, hook_body, load
from .test_cli import CLI, _free_port

HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"
pytestmark = pytest.mark.slow


def _serve(tmp_path: Path, name: str, env: dict[str, str], workers: int = 2) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    folder = tmp_path / name
    folder.mkdir()
    log = (folder / "serve.log").open("wb")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(
        [*CLI, "serve", "--workers", str(workers), "--threads", "4", "--port", str(port)],
        env={
            **os.environ,
            "CDS_AUTH_REQUIRED": "false",
            "CDS_AUDIT_KEY": "k" * 32,
            "CDS_AUDIT_SPOOL_DIR": str(folder / "spool"),
            "CDS_LOG_LEVEL": "WARNING",
            **env,
        },
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except requests.ConnectionError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"serve did not start: {(folder / 'serve.log').read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _workers(master: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{master}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


class Load:
    """Client threads posting hook calls (each its own hookInstance) until stopped."""

    def __init__(self, base: str, threads: int, on_card: Callable[[dict], None] | None = None) -> None:
        self.base, self.on_card = base, on_card
        self.answered: set[str] = set()
        self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]

    def _run(self, n: int) -> None:
        chart = load(HIGH_RISK)
        i = 0
        with requests.Session() as http:
            while not self._stop.is_set():
                i += 1
                body = hook_body(chart, hook_instance=f"load-{n}-{i}")
                try:
                    resp = http.post(f"{self.base}{SERVICE_URL}", json=body, timeout=30)
                except requests.RequestException:
                    with self._lock:
                        self.failed += 1
                    continue
                if resp.status_code == 200:
                    with self._lock:
                        self.answered.add(body["hookInstance"])
                    if self.on_card:
                        self.on_card(resp.json()["cards"][0])
                else:
                    with self._lock:
                        self.failed += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _wait_for(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return check()


def _gauge(base: str) -> float:
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("cds_audit_spool_records"):
            return float(line.split()[-1])
    return 0.0


@contextmanager
def sqlite_write_lock(db: Path) -> Iterator[None]:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def _stored_sqlite(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT hook_instance FROM hook_call")}


def test_a_sigkilled_worker_loses_no_answered_call(tmp_path):
    db = tmp_path / "cds.db"
    proc, base = _serve(tmp_path, "a", {"CDS_DATABASE_URL": f"sqlite:///{db}"})
    try:
        with Load(base, threads=4) as load_:
            time.sleep(1.0)
            # The database is held (a long backup, say): records wait in the workers' spools, so the
            # worker killed now has answered calls whose records only its spool holds.
            with sqlite_write_lock(db):
                time.sleep(1.5)
                victim = _workers(proc.pid)[0]
                os.kill(victim, signal.SIGKILL)
                time.sleep(1.0)
            time.sleep(1.0)
        answered = load_.answered
        assert len(answered) > 20 and victim not in _workers(proc.pid)
        # The surviving (and the replacement) workers adopt the dead worker's segment.
        assert _wait_for(lambda: answered <= _stored_sqlite(db)), len(answered - _stored_sqlite(db))
        assert _wait_for(lambda: _gauge(base) == 0)
    finally:
        _stop(proc)
    assert answered <= _stored_sqlite(db)
    assert not list((tmp_path / "a" / "spool").rglob("*.spool"))  # all forwarded, nothing left over


def _stored_pg(url: str, query: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query)).scalars())
    finally:
        engine.dispose()


def test_a_postgresql_outage_loses_nothing(tmp_path, postgres):
    url = postgres.new_database()
    proc, base = _serve(tmp_path, "a", {"CDS_DATABASE_URL": url})
    feedback_statuses: list[int] = []
    try:
        with Load(base, threads=3) as load_:
            time.sleep(1.0)
            postgres.halt()
            try:
                time.sleep(1.0)
                answered_in_outage = len(load_.answered)
                card = requests.post(
                    f"{base}{SERVICE_URL}", json=hook_body(load(HIGH_RISK)), timeout=10
                ).json()["cards"][0]
                feedback_statuses.append(
                    requests.post(
                        f"{base}{SERVICE_URL}/feedback",
                        json={"card": card["uuid"], "outcome": "accepted"},
                        timeout=10,
                    ).status_code
                )
                time.sleep(2.0)
                assert len(load_.answered) > answered_in_outage  # still answering, database down
                assert _gauge(base) > 0  # the alert: records held in the spool
            finally:
                postgres.resume()
            time.sleep(1.0)
        answered = load_.answered
        assert feedback_statuses == [200] and load_.failed == 0
        query = "SELECT hook_instance FROM hook_call"
        assert _wait_for(lambda: answered <= set(_stored_pg(url, query)), 60), "records lost in the outage"
        assert _wait_for(lambda: _stored_pg(url, "SELECT count(*) FROM feedback") == [1])
        assert _wait_for(lambda: _gauge(base) == 0)
    finally:
        _stop(proc)


def test_feedback_to_one_instance_for_another_instances_cards_under_load(tmp_path, postgres):
    url = postgres.new_database()
    a, base_a = _serve(tmp_path, "a", {"CDS_DATABASE_URL": url})
    b, base_b = _serve(tmp_path, "b", {"CDS_DATABASE_URL": url})
    statuses: list[int] = []
    session = threading.local()

    def feedback_to_b(card: dict) -> None:
        if len(statuses) >= 150:
            return
        http = getattr(session, "http", None) or requests.Session()
        session.http = http
        entry = {
            "card": card["uuid"],
            "outcome": "accepted",
            "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
        }
        statuses.append(http.post(f"{base_b}{SERVICE_URL}/feedback", json=entry, timeout=30).status_code)

    try:
        with Load(base_a, threads=6, on_card=feedback_to_b):
            assert _wait_for(lambda: len(statuses) >= 150, 120)
        assert statuses.count(200) == len(statuses), sorted(set(statuses))
        assert _wait_for(lambda: _stored_pg(url, "SELECT count(*) FROM feedback") == [len(statuses)])
    finally:
        _stop(a)
        _stop(b)

"""The audit trail: spooled before the answer, forwarded behind it. The answer never waits for the
database, every record still reaches it (batched, at shutdown too, after the database was busy), no
answer is given that the spool could not keep, and feedback names cards another worker answered.

The database is held busy with a real SQLite write lock (another connection's BEGIN IMMEDIATE), the
way a long backup or a burst of writers would hold it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, event, select

from cds_service import card_ids
from cds_service.settings import Settings
from cds_service.store.audit import AuditTrail
from cds_service.store.database import hook_call, normalise_url
from cds_service.store.records import CallRecord
from cds_service.web.app import create_app

from .conftest import FIXTURES, ROOT, SERVICE_URL, TODAY, hook_body, load

HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"


@contextmanager
def write_lock(db: Path) -> Iterator[None]:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def _app(db: Path):
    app = create_app(
        Settings(auth_required=False, database_url=f"sqlite:///{db}", audit_key="a" * 32), today=lambda: TODAY
    )
    app.config["TESTING"] = False
    return app


def _count(db: Path, table: str = "hook_call") -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _store_errors() -> float:
    return REGISTRY.get_sample_value("cds_store_errors_total", {"operation": "record_call"}) or 0.0


def test_the_answer_does_not_wait_for_the_audit_write(tmp_path):
    db = tmp_path / "cds.db"
    app = _app(db)
    audit: AuditTrail = app.extensions["cds.audit"]
    with write_lock(db):
        started = time.monotonic()
        resp = app.test_client().post(SERVICE_URL, json=hook_body(load(HIGH_RISK)))
        answered = time.monotonic() - started
        assert resp.status_code == 200 and len(resp.get_json()["cards"]) == 1
        assert answered < 2 and audit.pending == 1 and _count(db) == 0
    assert audit.flush() and audit.pending == 0
    assert _count(db) == 1 and _count(db, "hook_card") == 1


@pytest.mark.parametrize("before_answer", [False, True])
def test_the_record_is_written_before_the_answer_and_synced_behind_it_or_before_it(
    tmp_path, monkeypatch, before_answer
):
    """By default the answer waits for its record's write, not its fsync (the spool's syncer does that
    right behind); CDS_AUDIT_SYNC_BEFORE_ANSWER=true makes it wait for the fsync too."""
    import threading

    from cds_service.store import spool as spool_module

    settings = Settings(
        auth_required=False,
        database_url=f"sqlite:///{tmp_path / 'cds.db'}",
        audit_key="a" * 32,
        audit_sync_before_answer=before_answer,
    )
    app = create_app(settings, today=lambda: TODAY)
    audit: AuditTrail = app.extensions["cds.audit"]
    audit.spool.prepare()  # the segment made ahead, as the forwarder does
    disk = threading.Event()
    real = os.fdatasync
    monkeypatch.setattr(spool_module.os, "fdatasync", lambda fd: (disk.wait(10), real(fd)))
    answered = threading.Event()
    body = hook_body(load(HIGH_RISK))
    caller = threading.Thread(
        target=lambda: app.test_client().post(SERVICE_URL, json=body).status_code == 200 and answered.set()
    )
    caller.start()
    try:
        assert answered.wait(2) is not before_answer
        spooled = b"".join(p.read_bytes() for p in audit.spool.folder.glob("*.spool"))
        assert body["hookInstance"].encode() in spooled  # written before the answer in both modes
    finally:
        disk.set()
        caller.join(10)
    assert answered.is_set() and audit.flush() and _count(tmp_path / "cds.db") == 1


def test_records_queued_while_the_database_is_busy_are_written_together(tmp_path):
    db = tmp_path / "cds.db"
    app = _app(db)
    audit: AuditTrail = app.extensions["cds.audit"]
    commits = []
    event.listen(audit.store.engine, "commit", lambda _conn: commits.append(1))
    client = app.test_client()
    body = hook_body(load(HIGH_RISK))
    with write_lock(db):
        for _ in range(30):
            assert client.post(SERVICE_URL, json=body).status_code == 200
    assert audit.flush()
    assert _count(db) == 30 and _count(db, "hook_card") == 30
    # The writer took the first record alone (it was waiting), then the 29 that queued behind it.
    assert len(commits) <= 3


def test_no_answer_without_its_audit_record_when_the_spool_cannot_be_written(tmp_path, caplog):
    db = tmp_path / "cds.db"
    app = _app(db)
    audit: AuditTrail = app.extensions["cds.audit"]
    audit.spool.folder.parent.mkdir(parents=True, exist_ok=True)
    audit.spool.folder.write_text("not a folder")  # the spool cannot create its segment
    resp = app.test_client().post(SERVICE_URL, json=hook_body(load(HIGH_RISK)))
    assert resp.status_code == 503 and resp.get_json()["issue"][0]["code"] == "transient"
    assert "could not audit" in caplog.text and "cards" not in resp.get_json()


def test_feedback_for_a_card_another_worker_answered_is_taken_at_once(tmp_path):
    db = tmp_path / "cds.db"
    answering, receiving = _app(db), _app(db)  # two workers on one database
    with write_lock(db):  # the answering worker's audit record cannot reach the database
        card = (
            answering.test_client().post(SERVICE_URL, json=hook_body(load(HIGH_RISK))).get_json()["cards"][0]
        )
        entry = {
            "card": card["uuid"],
            "outcome": "accepted",
            "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
        }
        started = time.monotonic()
        resp = receiving.test_client().post(f"{SERVICE_URL}/feedback", json=entry)
        assert resp.status_code == 200 and time.monotonic() - started < 0.2  # no wait for the row
        assert _count(db) == 0 and _count(db, "feedback") == 0
    assert answering.extensions["cds.audit"].flush() and receiving.extensions["cds.audit"].flush()
    assert _count(db) == 1 and _count(db, "feedback") == 1


def test_a_forged_suggestion_on_a_signed_card_is_still_checked(tmp_path):
    app = _app(tmp_path / "cds.db")
    client = app.test_client()
    card = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK))).get_json()["cards"][0]
    other = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK), hook_instance="another")).get_json()
    foreign = other["cards"][0]["suggestions"][0]["uuid"]  # a real suggestion, of another card
    entry = {"card": card["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": foreign}]}
    assert client.post(f"{SERVICE_URL}/feedback", json=entry).status_code == 422


def test_without_a_key_this_runs_cards_are_known_at_once_and_another_runs_from_the_store(tmp_path):
    """CDS_AUDIT_KEY unset: the run's random key signs its cards, so feedback for them needs no
    database; a card another instance (another run, another random key) answered is not verifiable
    here and is looked up in the store: found once that instance's record is in, unknown (422) before."""
    db = tmp_path / "cds.db"
    app = create_app(Settings(auth_required=False, database_url=f"sqlite:///{db}"), today=lambda: TODAY)
    client = app.test_client()
    other_instance = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from cds_service.settings import Settings
        from cds_service.web.app import create_app
        from tests.conftest import TODAY, SERVICE_URL, hook_body, load
        from tests.test_audit import HIGH_RISK
        app = create_app(Settings(auth_required=False, database_url="sqlite:///{db}"), today=lambda: TODAY)
        body = hook_body(load(HIGH_RISK), hook_instance="other-instance")
        print(json.dumps(app.test_client().post(SERVICE_URL, json=body).get_json()["cards"][0]))
        if sys.argv[1] == "lost":
            import os
            os._exit(0)  # its audit record never reaches the database (its spool is elsewhere)
        """
    )

    def card_of_another_instance(fate: str) -> dict:
        env = {**os.environ, "CDS_AUDIT_SPOOL_DIR": str(tmp_path / f"spool-{fate}")}
        env.pop("CDS_AUDIT_KEY", None)
        done = subprocess.run(
            [sys.executable, "-c", other_instance, fate], capture_output=True, text=True, cwd=ROOT, env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    with write_lock(db):  # the database takes nothing: this run's own cards need it not
        card = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK))).get_json()["cards"][0]
        assert card_ids.is_ours(card["uuid"])
        entry = {"card": card["uuid"], "outcome": "accepted"}
        assert client.post(f"{SERVICE_URL}/feedback", json=entry).status_code == 200
    stored, lost = card_of_another_instance("stored"), card_of_another_instance("lost")
    assert not card_ids.is_ours(stored["uuid"]) and not card_ids.is_ours(lost["uuid"])
    assert (
        client.post(
            f"{SERVICE_URL}/feedback", json={"card": stored["uuid"], "outcome": "accepted"}
        ).status_code
        == 200
    )
    assert (
        client.post(f"{SERVICE_URL}/feedback", json={"card": lost["uuid"], "outcome": "accepted"}).status_code
        == 422
    )
    assert app.extensions["cds.audit"].flush()
    assert _count(db, "feedback") == 2


@pytest.mark.slow
def test_queued_records_are_written_before_the_process_exits(tmp_path):
    db = tmp_path / "cds.db"
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_audit import _app, hook_body, load, HIGH_RISK, SERVICE_URL
        client = _app(Path({str(db)!r})).test_client()
        print("ready", flush=True)
        sys.stdin.readline()
        for _ in range(20):
            assert client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK))).status_code == 200
        print("answered", flush=True)
        sys.exit(0)  # no flush here: the interpreter's exit must write the queue
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        with write_lock(db):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "answered"
            time.sleep(0.2)
            assert proc.poll() is None and _count(db) == 0  # exiting, yet waiting to write its records
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert _count(db) == 20


def test_a_card_nobody_answered_is_still_422_after_the_grace(client):
    entry = {"card": "8f3d2b7e-0000-4000-8000-000000000001", "outcome": "accepted"}
    started = time.monotonic()
    resp = client.post(f"{SERVICE_URL}/feedback", json=entry)
    assert resp.status_code == 422 and 0.2 <= time.monotonic() - started < 2


@contextmanager
def database_busy(url: str) -> Iterator[None]:
    """Hold off every audit write (SQLite: the write lock; PostgreSQL: a lock on hook_call)."""
    if url.startswith("sqlite"):
        with write_lock(Path(url.removeprefix("sqlite:///"))):
            yield
        return
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("LOCK TABLE hook_call IN EXCLUSIVE MODE")
            yield
            conn.rollback()
    finally:
        engine.dispose()


def test_a_record_the_database_refuses_costs_only_itself(database_url, caplog):
    app = create_app(
        Settings(auth_required=False, database_url=database_url, audit_key="a" * 32), today=lambda: TODAY
    )
    audit: AuditTrail = app.extensions["cds.audit"]
    client = app.test_client()
    good = hook_body(load(HIGH_RISK))
    # PostgreSQL stores no NUL character in text (SQLite does): that record fails, its batch-mates not.
    # (A hook call can no longer carry one — hookInstance must be printable — so it is queued directly.)
    nul = CallRecord("bad\x00instance", "crc-metastases", "p", dt.datetime.now(dt.UTC), "prefetch", 1.0)
    with database_busy(database_url):  # the writer takes the first call; the other three queue as one batch
        statuses = [client.post(SERVICE_URL, json=good).status_code for _ in range(2)]
        audit.submit(nul)
        statuses.append(client.post(SERVICE_URL, json=good).status_code)
        time.sleep(0.05)
    assert statuses == [200, 200, 200]
    assert audit.flush()
    with audit.store.read() as conn:
        stored = [r[0] for r in conn.execute(select(hook_call.c.hook_instance))]
    assert stored.count(good["hookInstance"]) == 3
    lost = [r for r in caplog.records if "could not audit" in r.getMessage()]
    assert len(stored) + len(lost) == 4 and "bad" not in caplog.text
    if database_url.startswith("postgresql"):
        assert len(lost) == 1


def test_a_full_spool_answers_503_and_every_answered_call_keeps_its_record(database_url, caplog):
    """A long outage in miniature: the database takes nothing while the spool fills to its cap. Calls
    are answered until then, 503 after (no answer without its record; feedback too); once the database
    is back the spool drains, every call answered 200 is in it and calls are answered again."""
    app = create_app(
        Settings(
            auth_required=False,
            database_url=database_url,
            audit_key="a" * 32,
            audit_spool_max_bytes=64 * 1024,
        ),
        today=lambda: TODAY,
    )
    audit: AuditTrail = app.extensions["cds.audit"]
    client = app.test_client()
    statuses: list[int] = []
    with database_busy(database_url):
        while len(statuses) < 400 and 503 not in statuses:
            body = hook_body(load(HIGH_RISK), hook_instance=f"outage-{len(statuses)}")
            resp = client.post(SERVICE_URL, json=body)
            statuses.append(resp.status_code)
            if len(statuses) == 1:
                card = resp.get_json()["cards"][0]
        answered = statuses.count(200)
        assert statuses == [200] * answered + [503] and answered > 20
        assert resp.get_json()["issue"][0]["code"] == "transient" and "cards" not in resp.get_json()
        again = client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK), hook_instance="outage-0"))
        assert again.status_code == 503 and again.headers["Retry-After"] == "30"
        feedback = {"card": card["uuid"], "outcome": "overridden"}  # a signed card: no store lookup
        posts = [client.post(f"{SERVICE_URL}/feedback", json=feedback).status_code for _ in range(20)]
        kept = posts.count(200)  # a feedback record is smaller than a call's: the last room is used
        assert posts == [200] * kept + [503] * (20 - kept) and kept < 10
        assert audit.spool.measure() <= 64 * 1024
        assert REGISTRY.get_sample_value("cds_audit_spool_bytes") > 60 * 1024 - 2048
        assert REGISTRY.get_sample_value("cds_store_errors_total", {"operation": "spool_full"}) >= 2
    assert audit.flush(60)
    with audit.store.read() as conn:
        stored = {r[0] for r in conn.execute(select(hook_call.c.hook_instance))}
    assert {f"outage-{i}" for i in range(answered)} <= stored and f"outage-{answered}" not in stored
    assert audit.store.counts()["feedback"] == kept
    assert client.post(SERVICE_URL, json=hook_body(load(HIGH_RISK), hook_instance="after")).status_code == 200
    assert (
        "the spool takes records again" in caplog.text and caplog.text.count("CDS_AUDIT_SPOOL_MAX_BYTES") == 1
    )

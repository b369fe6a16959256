"""The store on SQLite and on a real PostgreSQL server: schema, audit, feedback, JWT ids, concurrency."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import multiprocessing
import uuid
from concurrent.futures import ProcessPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from cds_service.settings import Settings
from cds_service.store.database import (
    CallRecord,
    CardRecord,
    FeedbackRecord,
    FeedbackResult,
    Store,
    StoreError,
    cards_of,
    close_stores,
    feedback,
    hook_call,
    hook_card,
    metadata,
    normalise_url,
    open_store,
    recorded_served_base,
)
from cds_service.store.records import new_record_id, spooled_call, spooled_feedback

KEY = "k" * 40
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
TABLES = {"hook_call", "hook_card", "feedback", "client_jti", "served_base", "cds_alembic_version"}


def _store(url: str, key: str = KEY) -> Store:
    return open_store(Settings(auth_required=False, database_url=url, audit_key=key))


def _card(n: int = 1, suggestions: tuple[str, ...] = ("s-1", "s-2")) -> CardRecord:
    return CardRecord(
        str(uuid.UUID(int=n)), "cai-2025-lung", "consider-nat", 2, 3, "undetermined", suggestions
    )


def _call(
    patient: str = "patient-123", cards: tuple[CardRecord, ...] = (), service: str = "svc"
) -> CallRecord:
    return CallRecord(f"hook-{uuid.uuid4()}", service, patient, NOW, "prefetch", 12.5, cards)


# --- schema --------------------------------------------------------------------------------------------


def test_open_creates_the_schema_at_head_and_reopening_is_a_no_op(database_url):
    store = _store(database_url)
    assert set(inspect(store.engine).get_table_names()) >= TABLES
    store.record_call(_call(cards=(_card(),)))
    close_stores()  # a new process: the migration runs again and must change nothing
    again = _store(database_url)
    with again.read() as conn:
        assert conn.execute(text("SELECT version_num FROM cds_alembic_version")).scalars().all() == ["0004"]
    assert again.counts()["hook_call"] == 1


def test_the_served_base_is_read_back_without_creating_or_migrating_anything(database_url, tmp_path):
    settings = Settings(auth_required=False, database_url=database_url, audit_key=KEY)
    missing = tmp_path / "none.db"
    assert recorded_served_base(settings.model_copy(update={"database_url": f"sqlite:///{missing}"})) is None
    assert not missing.exists()  # reading it did not create it
    store = _store(database_url)
    assert recorded_served_base(settings) is None  # a store, no server started on it yet
    store.record_served_base("http://127.0.0.1:8123", b"k" * 32)
    store.record_served_base("https://cds.example.org/crc")  # the last start wins
    recorded = recorded_served_base(settings)
    assert recorded is not None and recorded.base_url == "https://cds.example.org/crc"
    assert recorded.card_key is None
    store.record_served_base("http://127.0.0.1:8123", b"\x01" * 32)
    recorded = recorded_served_base(settings)
    assert recorded is not None and recorded.card_key == b"\x01" * 32
    with store.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM served_base")).scalar_one() == 1


def test_a_database_of_an_older_schema_has_no_served_base(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE hook_call (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    assert recorded_served_base(Settings(auth_required=False, database_url=url)) is None


def test_the_models_match_the_migrations(database_url):
    store = _store(database_url)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    # The version table is Alembic's, not ours.
    assert [d for d in diff if not (d[0] == "remove_table" and d[1].name == "cds_alembic_version")] == []


def _open_in_a_new_process(url: str) -> int:
    return _store(url).counts()["hook_call"]


def test_several_processes_starting_at_once_migrate_once(database_url):
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=spawn) as pool:
        assert list(pool.map(_open_in_a_new_process, [database_url] * 8)) == [0] * 8
    with create_engine(normalise_url(database_url)).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cds_alembic_version")).scalar_one() == 1


def test_a_database_that_cannot_be_opened_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        _store(f"sqlite:///{tmp_path / 'missing' / 'cds.db'}")
    with pytest.raises(StoreError, match="cannot open the database"):
        _store("postgresql://nobody@127.0.0.1:9/none")


def test_postgresql_urls_use_psycopg_3():
    assert normalise_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("sqlite:///x.db").drivername == "sqlite"


# --- audit ------------------------------------------------------------------------------------------------


def test_a_call_is_stored_with_its_cards_and_the_patient_only_as_a_keyed_hash(database_url):
    store = _store(database_url)
    store.record_call(_call("patient-123", (_card(1), _card(2, ()))))
    with store.read() as conn:
        (call,) = conn.execute(select(hook_call)).mappings().all()
        cards = conn.execute(select(hook_card).order_by(hook_card.c.id)).mappings().all()
        everything = " ".join(
            str(row) for table in metadata.sorted_tables for row in conn.execute(select(table)).all()
        )
    expected = hmac.new(KEY.encode(), b"Patient/patient-123", hashlib.sha256).hexdigest()
    assert call["patient_hash"] == expected and "patient-123" not in everything
    assert call["received_at"] == NOW and call["fhir_mode"] == "prefetch" and call["card_count"] == 2
    assert [c["card_uuid"] for c in cards] == [str(uuid.UUID(int=1)), str(uuid.UUID(int=2))]
    assert cards[0]["suggestion_uuids"] == ["s-1", "s-2"] and cards[1]["suggestion_uuids"] == []
    assert (cards[0]["model"], cards[0]["recommendation"], cards[0]["score_min"], cards[0]["score_max"]) == (
        "cai-2025-lung",
        "consider-nat",
        2,
        3,
    )


def test_another_key_gives_another_hash(database_url):
    assert _store(database_url).patient_hash("p") != _store(database_url, "z" * 40).patient_hash("p")


def test_card_suggestions_finds_only_this_services_cards(database_url):
    store = _store(database_url)
    store.record_call(_call(cards=(_card(1),)))
    store.record_call(_call(cards=(_card(1, ("s-3",)),)))  # the same card shown again (a retry)
    store.record_call(_call(cards=(_card(2),), service="other"))
    found = store.card_suggestions("svc", [str(uuid.UUID(int=n)) for n in (1, 2, 3)])
    assert found == {str(uuid.UUID(int=1)): frozenset({"s-1", "s-2", "s-3"})}
    assert store.card_suggestions("svc", []) == {}


def test_cards_of_reads_the_assessment_of_each_card():
    answer = {
        "cards": [
            {
                "uuid": "u1",
                "suggestions": [{"uuid": "a"}, {"label": "no uuid"}],
                "extension": {
                    "crc-cds-assessment": {
                        "model": "m",
                        "recommendation": "r",
                        "group": "g",
                        "score": {"min": 0, "max": 1},
                    }
                },
            },
            {"summary": "a card without uuid cannot get feedback"},
        ]
    }
    assert cards_of(answer) == (CardRecord("u1", "m", "r", 0, 1, "g", ("a",)),)


# --- feedback ------------------------------------------------------------------------------------------


def _accepted(card: int = 1, when: dt.datetime = NOW) -> FeedbackRecord:
    return FeedbackRecord(str(uuid.UUID(int=card)), "accepted", ("s-1",), outcome_timestamp=when)


def test_feedback_is_stored_once_however_often_it_is_posted(database_url):
    store = _store(database_url)
    first = store.record_feedback("svc", [_accepted(), _accepted()], NOW)
    again = store.record_feedback("svc", [_accepted()], NOW)
    later = store.record_feedback("svc", [_accepted(when=NOW + dt.timedelta(minutes=1))], NOW)
    assert (first.stored, first.duplicates, first.stored_outcomes) == (1, 0, ("accepted",))
    assert (again.stored, again.duplicates) == (0, 1)
    assert later.stored == 1  # another interaction with the same card is kept
    assert store.counts()["feedback"] == 2


def test_feedback_without_a_timestamp_is_kept_per_post(database_url):
    store = _store(database_url)
    entry = _accepted(when=None)  # type: ignore[arg-type]
    assert store.record_feedback("svc", [entry, entry], NOW).stored == 1
    assert store.record_feedback("svc", [entry], NOW).stored == 1  # another clinician, or a retry
    assert store.counts()["feedback"] == 2
    post = spooled_feedback("svc", [entry], NOW, new_record_id())
    assert store.write_spooled([post]) == [("svc", FeedbackResult(1, 0, ("accepted",)))]
    assert store.write_spooled([post]) == [("svc", FeedbackResult(0, 1))]  # a replayed spool segment
    assert store.counts()["feedback"] == 3


def test_a_replayed_call_record_is_written_once(database_url):
    store = _store(database_url)
    row = spooled_call(_call(cards=(_card(1), _card(2))), "hash")
    store.write_spooled([row])
    store.write_spooled([row, spooled_call(_call(), "hash")])
    assert store.counts()["hook_call"] == 2 and store.counts()["hook_card"] == 2


def test_feedback_fields_round_trip(database_url):
    store = _store(database_url)
    entry = FeedbackRecord(
        str(uuid.UUID(int=7)),
        "overridden",
        (),
        "urn:sys",
        "already-reviewed",
        "Already",
        "discussed at MDT on Monday",
        dt.datetime(2026, 3, 1, 13, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))),
    )
    store.record_feedback("svc", [entry], NOW)
    with store.read() as conn:
        row = conn.execute(select(feedback)).mappings().one()
    assert (row["override_system"], row["override_code"], row["override_display"], row["user_comment"]) == (
        "urn:sys",
        "already-reviewed",
        "Already",
        "discussed at MDT on Monday",
    )
    assert row["outcome_timestamp"] == NOW and row["outcome_timestamp"].tzinfo == dt.UTC
    assert row["received_at"] == NOW and row["accepted_suggestions"] == []


def test_naive_datetimes_are_refused(database_url):
    store = _store(database_url)
    with pytest.raises(Exception, match="naive datetime"):
        store.record_call(CallRecord("h", "svc", "p", NOW.replace(tzinfo=None), "prefetch", 1.0))


# --- client JWT ids ----------------------------------------------------------------------------------


def test_claim_jti_is_true_once_per_issuer(database_url):
    store = _store(database_url)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    assert store.claim_jti("jti-1", "https://ehr.example", expires) is True
    assert store.claim_jti("jti-1", "https://ehr.example", expires) is False
    assert store.claim_jti("jti-1", "https://other.example", expires) is True


def test_claim_jti_prunes_expired_ids(database_url):
    store = _store(database_url)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    store.claim_jti("old-1", "iss", past)
    store.claim_jti("old-2", "iss", past)
    store.claim_jti("new", "iss", dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
    assert store.counts()["client_jti"] == 1


# --- concurrent writers lose nothing -----------------------------------------------------------------------


def _write_many(url: str, worker: int, n: int) -> list[bool]:
    store = _store(url)
    claims = []
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    for i in range(n):
        card = _card(worker * 10_000 + i)
        store.record_call(_call(f"p-{worker}-{i}", (card,)))
        store.record_feedback("svc", [FeedbackRecord(card.uuid, "overridden", outcome_timestamp=NOW)], NOW)
        # Every worker claims the same ids: each must be granted exactly once overall.
        claims.append(store.claim_jti(f"jti-{i}", "iss", expires))
    return claims


def test_concurrent_processes_lose_no_rows_and_claim_each_jti_once(database_url):
    workers, n = 4, 40
    _store(database_url)  # migrated once up front: the writes are what is under test here
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        results = list(pool.map(_write_many, [database_url] * workers, range(workers), [n] * workers))
    counts = _store(database_url).counts()
    assert counts == {
        "hook_call": workers * n,
        "hook_card": workers * n,
        "feedback": workers * n,
        "client_jti": n,
    }
    granted = [sum(r[i] for r in results) for i in range(n)]
    assert granted == [1] * n


def test_pip_install_ships_the_migrations():
    """`pip install .` (the probe's and Docker's way) must carry every migration file."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder = root / "cds_service" / "store" / "migrations"
    assert {"cds_service.store.migrations", "cds_service.store.migrations.versions"} <= set(tool["packages"])
    data = set(tool["package-data"]["cds_service.store.migrations"])
    assert {p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".py"} <= data
    assert (folder / "versions" / "__init__.py").is_file()

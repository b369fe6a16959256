"""`cds-service report` on SQLite and PostgreSQL: calls, cards by recommendation, rates, reasons, latency."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import subprocess
import sys
import uuid

import pytest

from cds_service.settings import Settings
from cds_service.store.database import CallRecord, CardRecord, FeedbackRecord, Store, open_store
from cds_service.store.report import as_table, build_report, parse_since

DAY1 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
DAY2 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
REASON = ("urn:crc-cds:override-reason", "already-reviewed-by-mdt", "Already reviewed by the MDT")


def _uuid(n: int) -> str:
    return str(uuid.UUID(int=n))


def _show(
    store: Store, when: dt.datetime, latency_ms: float, card: int, recommendation: str, mode: str = "prefetch"
) -> None:
    cards = (
        (CardRecord(_uuid(card), "cai-2025-lung", recommendation, 1, 2, "moderate", ("s",)),) if card else ()
    )
    store.record_call(
        CallRecord(f"h-{uuid.uuid4()}", "crc-metastases", f"p{card}", when, mode, latency_ms, cards)
    )


def _answer(store: Store, card: int, outcome: str, reason: bool = False, comment: str | None = None) -> None:
    entry = FeedbackRecord(
        _uuid(card),
        outcome,
        ("s",) if outcome == "accepted" else (),
        *(REASON if reason else (None, None, None)),
        comment,
        DAY2,
    )
    store.record_feedback("crc-metastases", [entry], DAY2)


@pytest.fixture
def filled(database_url) -> tuple[str, Store]:
    """Day 1: cards 1-3 consider-nat (card 1 shown twice), one call without cards. Day 2: cards 4-5
    complete-risk-data, one fetched from FHIR. Card 1 accepted, 2 overridden with a reason and a
    comment, 4 overridden without reason; 3 and 5 unanswered."""
    store = open_store(Settings(auth_required=False, database_url=database_url))
    for card, latency in ((1, 10.0), (1, 11.0), (2, 12.0), (3, 13.0), (0, 5.0)):
        _show(store, DAY1, latency, card, "consider-nat")
    _show(store, DAY2, 20.0, 4, "complete-risk-data")
    _show(store, DAY2, 100.0, 5, "complete-risk-data", mode="fhir")
    _answer(store, 1, "accepted")
    _answer(store, 2, "overridden", reason=True, comment="MDT last week")
    _answer(store, 4, "overridden")
    return database_url, store


def test_report_over_all_time(filled):
    _, store = filled
    report = build_report(store)
    assert report.calls == 7 and report.calls_by_fhir_mode == {"prefetch": 6, "fhir": 1}
    assert report.latency_ms["p50"] == 12.0 and report.latency_ms["max"] == 100.0
    assert report.latency_ms["p50"] <= report.latency_ms["p95"] <= report.latency_ms["p99"] <= 100.0
    by_rec = {r.recommendation: r for r in report.recommendations}
    nat, crd = by_rec["consider-nat"], by_rec["complete-risk-data"]
    assert (nat.cards_shown, nat.distinct_cards, nat.accepted, nat.overridden) == (4, 3, 1, 1)
    assert nat.acceptance_rate == pytest.approx(1 / 3) and nat.override_rate == pytest.approx(1 / 3)
    assert (crd.cards_shown, crd.distinct_cards, crd.accepted, crd.overridden) == (2, 2, 0, 1)
    reasons = {r.code: r for r in report.override_reasons}
    assert (
        reasons["already-reviewed-by-mdt"].count == 1 and reasons["already-reviewed-by-mdt"].with_comment == 1
    )
    assert reasons["(no reason given)"].count == 1
    assert report.feedback_entries == 3


def test_since_keeps_the_later_calls_and_their_feedback(filled):
    _, store = filled
    report = build_report(store, parse_since("2026-03-02"))
    assert report.calls == 2 and report.latency_ms["max"] == 100.0
    assert [r.recommendation for r in report.recommendations] == ["complete-risk-data"]
    assert [r.code for r in report.override_reasons] == ["(no reason given)"]
    assert build_report(store, parse_since("2027-01-01")).calls == 0


def test_an_empty_store_reports_zeros(database_url):
    report = build_report(open_store(Settings(auth_required=False, database_url=database_url)))
    assert report.calls == 0 and report.latency_ms == {} and report.recommendations == []
    assert "Hook calls: 0" in as_table(report)


def test_parse_since():
    assert parse_since("2026-03-02") == dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    assert parse_since("2026-03-02T10:00:00+02:00") == dt.datetime(2026, 3, 2, 8, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="not a date"):
        parse_since("last week")


# --- the command, as an operator runs it ---------------------------------------------------------------


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CDS_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "cds_service.cli", "report", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.slow
def test_report_table(filled):
    proc = _cli(filled[0])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Hook calls: 7 (fhir 1, prefetch 6)" in out
    nat = next(line for line in out.splitlines() if "consider-nat" in line).split()
    assert nat == ["cai-2025-lung", "consider-nat", "4", "3", "1", "1", "33.3%", "33.3%"]
    assert "already-reviewed-by-mdt" in out and "MDT last week" not in out  # comments are counted, not shown


@pytest.mark.slow
def test_report_csv_since(filled):
    proc = _cli(filled[0], "--since", "2026-03-02", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    rows = {
        (r["section"], r["key"], r["metric"]): r["value"] for r in csv.DictReader(io.StringIO(proc.stdout))
    }
    assert rows[("calls", "all", "count")] == "2"
    assert rows[("recommendation", "cai-2025-lung/complete-risk-data", "override_rate")] == "0.5"
    assert rows[("latency_ms", "hook", "max")] == "100.0"
    assert not any(key[1].endswith("consider-nat") for key in rows)


@pytest.mark.parametrize(
    "args,message", [(["--since", "soon"], "not a date"), (["--format", "xml"], "invalid choice")]
)
@pytest.mark.slow
def test_report_bad_arguments_exit_2(tmp_path, args, message):
    proc = _cli(f"sqlite:///{tmp_path / 'cds.db'}", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_report_without_a_database_exits_2(tmp_path):
    proc = _cli(f"sqlite:///{tmp_path / 'absent.db'}")
    assert proc.returncode == 2 and "no database" in proc.stderr
    assert not (tmp_path / "absent.db").exists()

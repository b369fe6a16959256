"""`cds-service evaluate` on many files, gzip and broken ones; `report` naming our override reasons;
a closed pipe. In-process where that is the same code path, real processes where the OS is the point."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cds_service.cli import commands
from cds_service.cli.main import _parser
from cds_service.settings import Settings

from .conftest import FIXTURES

HIGH_RISK = FIXTURES / "01-lung-high-risk-all-four.json"
OUT_OF_SCOPE = FIXTURES / "16-out-peritoneal-only.json"
CLI = [sys.executable, "-m", "cds_service.cli"]


def evaluate(capsys, *argv: str) -> tuple[int, str, list[str]]:
    settings = Settings(auth_required=False)
    status = commands.evaluate(_parser().parse_args(["evaluate", *argv]), settings)
    out, err = capsys.readouterr()
    return status, out, err.splitlines()


@pytest.fixture
def single(capsys) -> dict[Path, str]:
    """Each fixture's single-file output (the regression oracle's form)."""
    found = {}
    for path in (HIGH_RISK, OUT_OF_SCOPE):
        status, out, err = evaluate(capsys, str(path))
        assert status == 0 and not err and out.count("\n") == 1
        found[path] = out
    return found


def test_a_gzip_file_answers_as_its_json_does(capsys, tmp_path, single):
    packed = tmp_path / "chart.json.gz"
    packed.write_bytes(gzip.compress(HIGH_RISK.read_bytes()))
    disguised = tmp_path / "chart.json"  # gzip is told by its bytes, not by its name
    disguised.write_bytes(packed.read_bytes())
    for path in (packed, disguised):
        assert evaluate(capsys, str(path)) == (0, single[HIGH_RISK], [])


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    gz = gzip.compress(HIGH_RISK.read_bytes())
    contents = {
        "invalid UTF-8": b"\x80\x81 not text",
        "UTF-16 BOM then garbage": b"\xff\xfe\x00garbage",
        "binary": bytes(range(256)),
        "truncated gzip": gz[: len(gz) // 2],
        "not gzip after the magic": b"\x1f\x8b" + b"x" * 40,
        "gzip of invalid UTF-8": gzip.compress(b'{"resourceType": "Bundle\x80"}'),
        "empty": b"",
        "nested too deeply": b"[" * 100_000 + b"]" * 100_000,
    }
    files = {}
    for i, (label, data) in enumerate(contents.items()):
        files[label] = tmp_path / f"bad-{i}.json"
        files[label].write_bytes(data)
    files["a directory"] = tmp_path
    return files


def test_undecodable_files_are_one_line_and_exit_2_never_an_internal_error(capsys, tmp_path):
    for label, path in _bad_files(tmp_path).items():
        status, out, err = evaluate(capsys, str(path))
        assert status == 2 and out == "", label
        assert len(err) == 1 and err[0].startswith(f"cds-service evaluate: {path}: "), (label, err)
        assert "internal error" not in err[0], (label, err)


def test_a_gzip_bomb_is_refused_within_the_cap(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "MAX_INPUT_BYTES", 1 << 20)
    bomb = tmp_path / "bomb.json.gz"
    bomb.write_bytes(gzip.compress(b" " * (8 << 20)))
    status, out, err = evaluate(capsys, str(bomb))
    assert (
        status == 2
        and out == ""
        and err == [f"cds-service evaluate: {bomb}: larger than 1 MiB once decompressed"]
    )
    big = tmp_path / "big.json"
    big.write_bytes(b" " * ((1 << 20) + 1))
    assert evaluate(capsys, str(big))[2] == [f"cds-service evaluate: {big}: larger than 1 MiB"]


def test_several_files_one_line_each_in_order_bad_ones_keep_their_place(capsys, tmp_path, single):
    broken = tmp_path / "broken.json"
    broken.write_text('{"resourceType": "Bundle", "entry": [')
    missing = tmp_path / "missing.json"
    paths = [HIGH_RISK, broken, OUT_OF_SCOPE, missing, HIGH_RISK]
    status, out, err = evaluate(capsys, *map(str, paths))
    lines = out.splitlines(keepends=True)
    assert status == 2 and len(lines) == len(paths)
    # Good files print exactly their single-file line, whatever their neighbours.
    assert [lines[0], lines[2], lines[4]] == [single[HIGH_RISK], single[OUT_OF_SCOPE], single[HIGH_RISK]]
    for line, path in ((lines[1], broken), (lines[3], missing)):
        outcome = json.loads(line)
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["diagnostics"].startswith(f"{path}: ")
    assert [e.split(": ")[1] for e in err] == [str(broken), str(missing)]


def test_with_path_labels_every_line(capsys, tmp_path, single):
    broken = tmp_path / "broken.json"
    broken.write_bytes(b"\x80")
    status, out, err = evaluate(capsys, "--with-path", str(HIGH_RISK), str(broken))
    records = [json.loads(line) for line in out.splitlines()]
    assert status == 2 and [r["path"] for r in records] == [str(HIGH_RISK), str(broken)]
    assert records[0]["answer"] == json.loads(single[HIGH_RISK])
    assert records[1]["answer"]["resourceType"] == "OperationOutcome" and len(err) == 1
    status, out, _ = evaluate(capsys, "--with-path", str(broken))  # labelled even when alone
    assert status == 2 and json.loads(out)["path"] == str(broken)


def test_a_bug_on_one_file_costs_only_that_file(capsys, monkeypatch, single):
    import cds_service.pipeline as pipeline

    real = pipeline.answer

    def flaky(body, *args, **kwargs):
        if body["context"]["patientId"] == json.loads(HIGH_RISK.read_text())["entry"][0]["resource"]["id"]:
            raise KeyError("a bug")
        return real(body, *args, **kwargs)

    monkeypatch.setattr(pipeline, "answer", flaky)
    status, out, err = evaluate(capsys, str(HIGH_RISK), str(OUT_OF_SCOPE))
    lines = out.splitlines(keepends=True)
    assert status == 1 and lines[1] == single[OUT_OF_SCOPE]
    assert json.loads(lines[0])["issue"][0]["code"] == "exception"
    assert err == [f"cds-service evaluate: {HIGH_RISK}: internal error (KeyError)"]


@pytest.mark.slow
def test_a_reader_that_leaves_early_is_not_an_error(tmp_path):
    proc = subprocess.Popen(
        [*CLI, "evaluate", *[str(HIGH_RISK)] * 40], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
        env={**os.environ, "CDS_AUTH_REQUIRED": "false"},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_report_names_our_override_reasons_sent_without_a_display(tmp_path, capsys):
    from cds_service.render.cards import OVERRIDE_SYSTEM, override_reason_displays
    from cds_service.store.database import CallRecord, CardRecord, FeedbackRecord, open_store
    from cds_service.store.report import build_report

    settings = Settings(auth_required=False, database_url=f"sqlite:///{tmp_path / 'r.db'}")
    store = open_store(settings)
    when = dt.datetime.now(dt.UTC)
    cards = []
    for n in range(3):
        card = str(uuid.uuid4())
        cards.append(card)
        record = CardRecord(card, "cai-2025-lung", "consider-nat", 1, 2, "moderate", ("s",))
        store.record_call(CallRecord(f"h-{n}", "crc-metastases", f"p{n}", when, "prefetch", 10.0, (record,)))
    sent = [
        (OVERRIDE_SYSTEM, "already-reviewed-by-mdt", None),  # the CDS Hooks sandbox's form
        (OVERRIDE_SYSTEM, "patient-not-candidate", "Their own words"),  # a client's display is kept
        ("urn:other", "already-reviewed-by-mdt", None),  # not our system: nothing to name it by
    ]
    for card, (system, code, display) in zip(cards, sent, strict=True):
        store.record_feedback(
            "crc-metastases",
            [FeedbackRecord(card, "overridden", (), system, code, display, None, when)],
            when,
        )
    for fmt in ("table", "csv"):
        assert commands.report(_parser().parse_args(["report", "--format", fmt]), settings) == 0
        out = capsys.readouterr().out
        assert override_reason_displays()[(OVERRIDE_SYSTEM, "already-reviewed-by-mdt")] in out, fmt
        assert "Their own words" in out
        assert override_reason_displays()[(OVERRIDE_SYSTEM, "patient-not-candidate")] not in out
    built = commands._with_our_reason_displays(build_report(store))
    displays = {(r.system, r.code): r.display for r in built.override_reasons}
    assert displays[("urn:other", "already-reviewed-by-mdt")] == "-"

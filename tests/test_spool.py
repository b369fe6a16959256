"""The local audit spool: durable appends shared by one fsync (group commit), torn lines skipped,
segments of dead processes adopted, segments of live ones left alone."""

from __future__ import annotations

import fcntl
import os
import threading

import orjson
import pytest

from cds_service.store import spool as spool_module
from cds_service.store.spool import Spool, SpoolError


def _line(n: int) -> bytes:
    return orjson.dumps({"n": n}) + b"\n"


def test_concurrent_appends_share_fsyncs(tmp_path, monkeypatch):
    syncs = []
    real = os.fdatasync
    gate = threading.Event()

    def slow_sync(fd: int) -> None:
        syncs.append(fd)
        gate.wait(0.05)  # a disk that takes a while: later writers queue behind this sync
        real(fd)

    monkeypatch.setattr(spool_module.os, "fdatasync", slow_sync)
    spool = Spool(tmp_path / "spool")
    threads = [threading.Thread(target=spool.append, args=(_line(i),)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    segment = spool.seal()
    assert segment is not None and segment.records == 20
    assert sorted(r["n"] for r in segment.read()) == list(range(20))
    assert 1 <= len(syncs) < 10  # one sync covered many appends


def test_append_returns_only_after_the_sync(tmp_path, monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(spool_module.os, "fdatasync", lambda fd: events.append("sync"))
    spool = Spool(tmp_path / "spool")
    spool.append(_line(1))
    events.append("returned")
    assert events == ["sync", "returned"]
    unsynced = Spool(tmp_path / "other", fsync=False)
    unsynced.append(_line(1))
    assert events == ["sync", "returned"]


def test_a_failed_sync_is_an_error_for_the_writer(tmp_path, monkeypatch):
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    spool = Spool(tmp_path / "spool")
    spool.append(_line(0))
    monkeypatch.setattr(spool_module.os, "fdatasync", broken)
    with pytest.raises(SpoolError):
        spool.append(_line(1))


def test_a_torn_last_line_is_skipped(tmp_path):
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.append(_line(1))
    segment = spool.seal()
    assert segment is not None
    os.write(segment.fd, b'{"n": 2')  # a power cut in the middle of a write: never acknowledged
    assert segment.read() == [{"n": 1}]


def test_only_segments_no_live_process_holds_are_adopted(tmp_path):
    folder = tmp_path / "spool"
    live, dead = Spool(folder, fsync=False), Spool(folder, fsync=False)
    live.append(_line(1))
    dead.append(_line(2))
    dead_segment = dead.seal()
    assert dead_segment is not None
    dead.release(dead_segment)  # its process is gone: the lock with it
    adopter = Spool(folder, fsync=False)
    adopted = list(adopter.adopt(set()))
    assert [s.read() for s in adopted] == [[{"n": 2}]]  # the live process's segment stays its own
    assert list(Spool(folder).adopt(set())) == []  # held by the adopter now
    adopter.discard(adopted[0])
    assert not dead_segment.path.exists()
    assert live.seal() is not None


def test_a_segment_discarded_meanwhile_is_not_adopted(tmp_path):
    folder = tmp_path / "spool"
    owner = Spool(folder, fsync=False)
    owner.append(_line(1))
    segment = owner.seal()
    assert segment is not None
    fd = os.open(segment.path, os.O_RDONLY)  # another process has it open, waiting for the lock
    owner.discard(segment)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert os.fstat(fd).st_nlink == 0  # what adopt() checks before taking a segment
    finally:
        os.close(fd)
    assert list(Spool(folder).adopt(set())) == []

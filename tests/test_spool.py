"""The local audit spool: durable appends shared by one fsync (group commit), torn lines skipped,
segments of dead processes adopted, segments of live ones left alone."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time

import orjson
import pytest

from cds_service.store import spool as spool_module
from cds_service.store.spool import Spool, SpoolError, SpoolFull


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
    spool.prepare()  # the segment made ahead (its space and name synced too)
    events.clear()
    spool.append(_line(1))
    events.append("returned")
    assert events == ["sync", "returned"]
    unsynced = Spool(tmp_path / "other", fsync=False)
    unsynced.append(_line(1))
    assert events == ["sync", "returned"]


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_behind_the_answer_an_append_returns_once_written_and_the_syncer_syncs_it(tmp_path, monkeypatch):
    synced = threading.Event()
    gate = threading.Event()
    real = os.fdatasync

    def held_sync(fd: int) -> None:
        gate.wait(5)  # the disk answers only when the test says so
        real(fd)
        synced.set()

    spool = Spool(tmp_path / "spool", before_return=False)
    spool.prepare()
    monkeypatch.setattr(spool_module.os, "fdatasync", held_sync)
    started = time.monotonic()
    spool.append(_line(1))
    assert time.monotonic() - started < 1  # not waiting for the held sync
    segment_path = spool._active.path  # type: ignore[union-attr]
    assert orjson.loads(segment_path.read_bytes().rstrip(b"\0")) == {"n": 1}  # written: a kill loses nothing
    assert spool._synced == 0 and not synced.is_set()
    gate.set()
    assert synced.wait(5) and _wait_for(lambda: spool._synced == 1)


def test_behind_the_answer_appends_wait_once_the_syncer_is_too_far_behind(tmp_path, monkeypatch):
    gate = threading.Event()
    real = os.fdatasync
    monkeypatch.setattr(spool_module, "BEHIND_MAX_LINES", 5)

    def held_sync(fd: int) -> None:
        gate.wait(5)
        real(fd)

    spool = Spool(tmp_path / "spool", before_return=False)
    spool.prepare()
    monkeypatch.setattr(spool_module.os, "fdatasync", held_sync)
    for n in range(4):
        spool.append(_line(n))  # within the bound: not waiting
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (spool.append(_line(4)), spool.append(_line(5)), done.set()))
    waiter.start()
    assert not done.wait(0.3)  # the fifth unsynced line waits for the disk
    gate.set()
    assert done.wait(5)
    waiter.join(5)
    assert spool._synced >= 5


def test_behind_the_answer_a_failed_sync_refuses_every_later_append(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool", before_return=False)
    spool.prepare()

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module.os, "fdatasync", broken)
    spool.append(_line(0))  # answered: its sync fails behind it
    assert _wait_for(lambda: spool._sync_failed is not None)
    with pytest.raises(SpoolError):
        spool.append(_line(1))
    segment = spool.seal()
    assert segment is None or [r["n"] for r in segment.read()] == [0]  # the refused line was not written


def test_behind_the_answer_sealing_syncs_what_the_syncer_has_not(tmp_path, monkeypatch):
    syncs: list[int] = []
    spool = Spool(tmp_path / "spool", before_return=False)
    spool.prepare()
    monkeypatch.setattr(spool_module, "BEHIND_MAX_LINES", 10**6)
    monkeypatch.setattr(spool, "_start_syncer", lambda: None)  # a syncer that has not run yet
    monkeypatch.setattr(spool_module.os, "fdatasync", lambda fd: syncs.append(fd))
    for n in range(3):
        spool.append(_line(n))
    assert syncs == [] and spool._synced == 0
    segment = spool.seal()
    assert segment is not None and len(syncs) == 1 and spool._synced == 3


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
    os.pwrite(
        segment.fd, b'{"n": 2', os.fstat(segment.fd).st_size
    )  # a power cut mid-write: never acknowledged
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


# Another process's forwarder: adopts (and discards) every segment it can lock in `folder`.
_ADOPTER = """
import sys, time
from pathlib import Path
from cds_service.store.spool import Spool
spool = Spool(Path(sys.argv[1]), fsync=False)
seconds = float(sys.argv[2])
adopted = 0
deadline = time.monotonic() + seconds
while True:
    for segment in spool.adopt(set()):
        adopted += 1
        if seconds == 0:  # hold it (as a forwarder does while it writes) until told to go on
            print(adopted, flush=True)
            sys.stdin.readline()
        spool.discard(segment)
    if time.monotonic() >= deadline:
        break
print(adopted, flush=True)
"""


def test_a_segment_being_created_is_never_adopted_by_another_process(tmp_path, monkeypatch):
    """The instant between creating a segment and locking it: another process's forwarder listing the
    folder then must not take the new segment for an orphan (the writer's flock failed: EAGAIN, 503)."""
    folder = tmp_path / "spool"
    real_flock = fcntl.flock
    adopted: list[str] = []

    class Fcntl:
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        @staticmethod
        def flock(fd: int, operation: int) -> None:
            # The file exists and is not locked yet: let a real forwarder process look at the folder now.
            child = subprocess.Popen(
                [sys.executable, "-c", _ADOPTER, str(folder), "0"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert child.stdout is not None and child.stdin is not None
                adopted.append(child.stdout.readline().strip())  # it adopted something, or finished
                real_flock(fd, operation)
            finally:
                child.communicate("\n", timeout=30)

    monkeypatch.setattr(spool_module, "fcntl", Fcntl)
    spool = Spool(folder, fsync=False)
    spool.append(_line(1))  # was: SpoolError [Errno 11] Resource temporarily unavailable
    assert adopted == ["0"]
    monkeypatch.setattr(spool_module, "fcntl", fcntl)
    spool.append(_line(2))
    segment = spool.seal()
    assert segment is not None and segment.read() == [{"n": 1}, {"n": 2}]


def test_segments_come_and_go_while_other_processes_adopt(tmp_path):
    """Saturation in miniature: a writer starting a new segment every few appends (its forwarder seals
    the old one) while two other processes' forwarders adopt whatever they can: no append fails and
    no live segment is taken."""
    folder = tmp_path / "spool"
    folder.mkdir()
    adopters = [
        subprocess.Popen(
            [sys.executable, "-c", _ADOPTER, str(folder), "3"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    spool = Spool(folder, fsync=False)
    written = kept = 0
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        for _ in range(3):
            spool.append(_line(written))
            written += 1
        segment = spool.seal()
        assert segment is not None
        kept += len(segment.read())
        spool.discard(segment)
    counts = [int(p.communicate(timeout=30)[0]) for p in adopters]
    assert counts == [0, 0] and kept == written > 300


def test_an_abandoned_new_segment_is_cleared(tmp_path):
    folder = tmp_path / "spool"
    folder.mkdir()
    stale, fresh = folder / f".1-a{spool_module.NEW_SUFFIX}", folder / f".1-b{spool_module.NEW_SUFFIX}"
    stale.touch()
    fresh.touch()
    old = time.time() - spool_module.ABANDONED_AFTER_S - 5
    os.utime(stale, (old, old))
    assert list(Spool(folder).adopt(set())) == []
    assert not stale.exists() and fresh.exists()


def test_the_spool_refuses_records_at_its_cap_across_processes_and_takes_them_again_once_forwarded(
    tmp_path,
):
    folder = tmp_path / "spool"
    line = orjson.dumps({"n": 0, "pad": "x" * 1000}) + b"\n"
    cap = 64 * 1024
    mine, other = Spool(folder, fsync=False, max_bytes=cap), Spool(folder, fsync=False, max_bytes=cap)
    taken = 0
    with pytest.raises(SpoolFull):
        while True:
            mine.append(line)
            taken += 1
    assert taken == cap // len(line) and mine.size <= cap
    time.sleep(spool_module.RESCAN_S)
    with pytest.raises(SpoolFull):  # another process sees the folder full too
        other.append(line)
    segment = mine.seal()
    assert segment is not None and len(segment.read()) == taken
    mine.discard(segment)  # forwarded to the database
    mine.append(line)
    time.sleep(spool_module.RESCAN_S)
    other.append(line)
    # Each live segment's file also holds the zeros written ahead of its records; this process's own
    # are not counted, another's are (at most WRITE_AHEAD).
    assert 2 * len(line) < mine.measure() <= 2 * len(line) + spool_module.WRITE_AHEAD


def test_a_record_after_a_write_that_failed_part_way_is_kept(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.append(_line(1))
    real_pwrite = os.pwrite

    def disk_full(fd: int, data, offset: int) -> int:
        real_pwrite(fd, bytes(data[:5]), offset)  # part of the line made it to the file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module.os, "pwrite", disk_full)
    with pytest.raises(SpoolError):
        spool.append(_line(2222222))  # never acknowledged
    monkeypatch.setattr(spool_module.os, "pwrite", real_pwrite)
    spool.append(_line(3))  # acknowledged: it must not be glued to the partial line
    segment = spool.seal()
    assert segment is not None and segment.read() == [{"n": 1}, {"n": 3}]


def test_space_is_written_ahead_so_a_sync_never_has_a_new_size_to_commit(tmp_path):
    """Records overwrite zeros written a chunk at a time: the file's size changes once per chunk, not
    per record (fdatasync then flushes data only). A segment left by a killed writer still reads as
    its records; a sealed one is cut to them."""
    folder = tmp_path / "spool"
    writer = Spool(folder)
    sizes = set()
    for n in range(20):
        writer.append(_line(n))
        sizes.add(writer._active.path.stat().st_size)
    assert sizes == {spool_module.WRITE_AHEAD}
    killed = writer._active
    writer.release(killed)  # its process is gone (SIGKILL): the zeros ahead are still there
    (adopted,) = Spool(folder).adopt(set())
    assert [r["n"] for r in adopted.read()] == list(range(20))
    sealed = Spool(folder)
    sealed.append(_line(1))
    segment = sealed.seal()
    assert segment is not None and segment.path.stat().st_size == len(_line(1))

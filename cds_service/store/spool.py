"""A local, append-only, fsync'd spool: what the service answers is written before the answer leaves.

Each process appends records (one JSON line each) to its own segment file in the spool folder and
holds an exclusive `flock` on it while the file is its own (a segment is created under a name no
one adopts, locked, then renamed: no live segment is ever seen unlocked). `append` returns once the
line is written — in the kernel's hands, so a killed process loses nothing — and the syncer thread
brings it to stable storage (`fdatasync`) right behind; a power cut can take only what was written
while that sync ran. With `before_return` (CDS_AUDIT_SYNC_BEFORE_ANSWER), `append` returns once
the line is synced, and the answer waits for that. Many lines share one sync: whoever arrives while
a sync is running waits for (or is covered by) the next one, which syncs every line written
meanwhile (group commit), so under load an fsync costs each call a fraction of one. Lines
overwrite zeros written ahead a chunk at a time (cut off when the segment is sealed), so most syncs
flush data with no new file size to commit: about half the CPU and a third of the wait of syncing
an append on ext4.

The audit trail's forwarder `seal`s the active segment (new records go to a fresh one), copies its
records into the database in one transaction, then `discard`s it (unlink, then unlock). A segment
whose process died (SIGKILL, out of memory, power cut) is no longer locked: any process of any
instance sharing the folder `adopt`s it and forwards it the same way. Forwarding is idempotent
(every record carries its own id, which the database keeps unique), so a crash between the
database's commit and the unlink only replays records the database then ignores.

What a segment holds: no patient id (only the keyed hash the database stores), but clinicians'
free-text feedback comments as sent — protect the folder as you protect the database.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

log = logging.getLogger("cds_service.audit")

SUFFIX = ".spool"
NEW_SUFFIX = ".new"  # a segment being created (see Spool._segment)
ABANDONED_AFTER_S = 60.0
# How often a spool at its cap measures the folder again (other processes may have emptied segments).
RESCAN_S = 0.1
# How old the folder's measure may grow while far from the cap: other processes' records count within
# a second, so the folder exceeds the cap by at most about a second of every process's records.
MEASURE_EVERY_S = 1.0
# Sync behind the answer (the default): how far the syncer may fall behind before appends wait for it
# as they do when syncing before the answer. A sync normally takes well under a millisecond to a few
# milliseconds; these bound what a power cut can take when the disk stalls.
BEHIND_MAX_LINES = 1000
BEHIND_MAX_S = 0.5
SYNCER_IDLE_S = 5.0
# How long the syncer lets lines gather before it syncs them.
SYNC_GATHER_S = 0.005
# Zeros written ahead of the records, a chunk at a time (see Spool.append); cut off when sealed.
WRITE_AHEAD = 16 * 1024  # about 40 records


class SpoolError(OSError):
    """The spool cannot take a record (disk full, folder gone, I/O error)."""


class SpoolFull(SpoolError):
    """The spool folder holds its cap (`max_bytes`): records are not reaching the database."""


@dataclass
class Segment:
    path: Path
    fd: int
    records: int  # lines appended (or, for an adopted segment, found)
    # Where the next line goes, and how far the file is already written (with zeros beyond `offset`).
    # A line is written at `offset`, which moves only once the whole line is written: a write the
    # disk cut short is overwritten by the next line, so an acknowledged line is always whole and
    # between newlines (what is left of the failed one after it is skipped when read).
    offset: int = 0
    end: int = 0

    def read(self) -> list[dict]:
        """Every complete record. A torn last line (a power cut mid-write) was never acknowledged."""
        chunks = []
        offset = 0
        while chunk := os.pread(self.fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        records = []
        # The zeros after the last line: space written ahead (see `Spool.append`), never a record's
        # (a JSON line holds no NUL byte).
        for line in b"".join(chunks).rstrip(b"\0").split(b"\n"):
            if not line:
                continue
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                log.warning("audit spool %s: an incomplete record skipped", self.path.name)
        return records


class Spool:
    """One process's segments in `folder`: append (durably), seal, adopt others' orphans, discard."""

    def __init__(
        self, folder: Path, *, fsync: bool = True, before_return: bool = True, max_bytes: int | None = None
    ) -> None:
        self.folder = folder
        self.fsync = fsync
        # True: `append` returns once its line is synced. False: once it is written (in the kernel's
        # hands: a killed process loses nothing), the syncer thread syncing it right behind.
        self.sync_before_return = before_return
        # The cap on the folder's segments (every process's): beyond it `append` raises SpoolFull.
        self.max_bytes = max_bytes
        self._folder_bytes = 0  # the folder's segments as last measured, less what was discarded since
        self._grown = 0  # bytes this process appended since that measure
        self._measured_at = -1e9
        self._cond = threading.Condition()
        self._active: Segment | None = None
        self._pid = os.getpid()
        self._written = 0  # lines appended by this process (all segments)
        self._synced = 0  # of those, known to be on stable storage
        self._syncing = False
        self._unsynced_since = 0.0  # when the oldest line not yet synced was written
        self._syncer: threading.Thread | None = None
        self._sync_failed: str | None = None

    def append(self, line: bytes) -> None:
        """Write one record (a JSON line); return once it is written, or once it is on stable storage
        when `sync_before_return` (or when the syncer is behind: see BEHIND_MAX_LINES). SpoolError
        when it cannot be written."""
        with self._cond:
            if self._sync_failed is not None:
                raise SpoolError(errno.EIO, f"audit spool sync failed: {self._sync_failed}")
            if self.max_bytes is not None and (
                self._folder_bytes + self._grown + len(line) > self.max_bytes
                or time.monotonic() - self._measured_at >= MEASURE_EVERY_S
            ):
                self._check_room(len(line))
            try:
                segment = self._segment()
                if segment.offset + len(line) > segment.end:
                    # Space is written ahead (zeros), a chunk at a time: overwriting written blocks
                    # leaves the file's size alone, so `fdatasync` flushes the data only, with no
                    # journal commit for a new size — about half the CPU and a third of the wait of
                    # syncing an append (ext4). One sync in a chunk's worth of records pays that.
                    grow = max(WRITE_AHEAD, segment.offset + len(line) - segment.end)
                    _pwrite_all(segment.fd, bytes(grow), segment.end)
                    segment.end += grow
                _pwrite_all(segment.fd, line, segment.offset)
            except OSError as exc:
                raise SpoolError(exc.errno, f"audit spool write failed: {exc.strerror}") from None
            segment.offset += len(line)
            self._grown += len(line)
            segment.records += 1
            self._written += 1
            if not self.fsync:
                return
            if self._synced == self._written - 1:
                self._unsynced_since = time.monotonic()
            if not self.sync_before_return and (
                self._written - self._synced < BEHIND_MAX_LINES
                and time.monotonic() - self._unsynced_since < BEHIND_MAX_S
            ):
                self._start_syncer()
                self._cond.notify_all()  # the syncer
                return
            # Syncing before the answer, or the disk is not keeping up: wait for this line's sync.
            self._sync_through(self._written)

    def _sync_through(self, mine: int) -> None:
        """Return once line `mine` is on stable storage (called with the lock held): lead a sync
        for every line written so far, or wait for the one running, which may not cover it."""
        while self._synced < mine:
            if self._syncing:
                self._cond.wait()  # a sync is running; the next one will cover this line
                continue
            segment = self._active
            if segment is None:  # sealed meanwhile: `seal` synced every line written before
                return
            self._syncing = True
            fd, target = segment.fd, self._written
            self._cond.release()  # not held meanwhile: other callers append
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise SpoolError(exc.errno, f"audit spool sync failed: {exc.strerror}") from None
            finally:
                self._cond.acquire()
                self._syncing = False
                self._cond.notify_all()
            self._synced = max(self._synced, target)

    def _start_syncer(self) -> None:
        # Called with the lock held. One per process, started in the process that writes.
        if self._syncer is None or not self._syncer.is_alive():
            self._syncer = threading.Thread(target=self._sync_behind, name="cds-audit-syncer", daemon=True)
            self._syncer.start()

    def _sync_behind(self) -> None:
        """The syncer thread: syncs whatever was written, as soon as it is written (group commit);
        exits after SYNCER_IDLE_S with nothing to sync (the next append starts another)."""
        with self._cond:
            while True:
                if self._synced >= self._written or self._syncing:
                    if not self._cond.wait(SYNCER_IDLE_S) and self._synced >= self._written:
                        self._syncer = None
                        return
                    continue
                if SYNC_GATHER_S:
                    # Lines written meanwhile share this sync: at a few calls a second, a sync a
                    # call would cost more CPU than the calls themselves.
                    self._cond.release()
                    try:
                        time.sleep(SYNC_GATHER_S)
                    finally:
                        self._cond.acquire()
                try:
                    self._sync_through(self._written)
                except SpoolError as exc:
                    # The answers are already sent: every later append fails (503) until a restart,
                    # rather than answer with records that may never reach the disk.
                    self._sync_failed = exc.strerror or "I/O error"
                    self._cond.notify_all()
                    self._syncer = None
                    log.error("audit spool: %s; hook calls are refused until the service is restarted", exc)
                    return

    @property
    def measured_at(self) -> float:
        """When the folder was last measured (time.monotonic())."""
        return self._measured_at

    @property
    def size(self) -> int:
        """The folder's segments in bytes, as this process knows it (measured, plus appended since)."""
        return self._folder_bytes + self._grown

    def measure(self) -> int:
        """Measure the folder's segments (every process's) now; their bytes."""
        with self._cond:
            grown = self._grown
        total = self._scan()
        with self._cond:
            # What was appended during the scan may be counted twice: the cap errs on the safe side.
            self._folder_bytes, self._grown = total, self._grown - grown
            self._measured_at = time.monotonic()
            return self.size

    def _check_room(self, needed: int) -> None:
        # Called with the lock held, near the cap or once a measure is MEASURE_EVERY_S old: measure
        # again (at most every RESCAN_S), to count what other processes appended and what their
        # forwarders emptied meanwhile.
        if time.monotonic() - self._measured_at >= RESCAN_S:
            self._folder_bytes, self._grown = self._scan(), 0
            self._measured_at = time.monotonic()
        assert self.max_bytes is not None
        if self._folder_bytes + self._grown + needed > self.max_bytes:
            raise SpoolFull(
                errno.ENOSPC,
                f"audit spool full ({self.size} bytes, cap {self.max_bytes}): records are not forwarded",
            )

    def _scan(self) -> int:
        # File sizes: a live segment's include the zeros written ahead (at most WRITE_AHEAD each);
        # this process's own are left out.
        active = self._active
        total = -(active.end - active.offset) if active is not None else 0
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if entry.name.endswith(SUFFIX):
                        with contextlib.suppress(OSError):
                            total += entry.stat().st_size
        except OSError:
            pass
        return max(total, 0)

    def seal(self) -> Segment | None:
        """Stop appending to the active segment and hand it over (None when it holds nothing)."""
        with self._cond:
            segment = self._active
            if segment is None or segment.records == 0 or self._pid != os.getpid():
                return None
            while self._syncing:  # its fd must stay open until that sync returns
                self._cond.wait()
            if self.fsync and self._synced < self._written:
                # Lines whose writers are still waiting for a sync: done here, as the file is handed over.
                try:
                    os.fdatasync(segment.fd)
                except OSError:
                    return None  # keep appending here; those writers lead the sync and get the error
                self._synced = self._written
                self._cond.notify_all()
            self._active = None
            with contextlib.suppress(OSError):  # the zeros written ahead: not part of it
                os.ftruncate(segment.fd, segment.offset)
            return segment

    def adopt(self, exclude: set[Path]) -> Iterator[Segment]:
        """Segments in the folder no live process holds (their writer died): each one, locked."""
        try:
            names = sorted(p for p in self.folder.iterdir() if p.suffix == SUFFIX)
        except OSError:
            return
        self._clear_abandoned()
        for path in names:
            active = self._active
            if path in exclude or (active is not None and path == active.path):
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue  # discarded meanwhile by its forwarder
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_nlink == 0:  # forwarded and unlinked between listing and locking
                    raise BlockingIOError
            except OSError:
                os.close(fd)
                continue
            yield Segment(path, fd, -1)

    def _clear_abandoned(self) -> None:
        # A process that died between creating a segment and renaming it left an empty dotfile.
        # Only old ones are looked at: a live writer locks its new file within microseconds.
        now = time.time()
        with contextlib.suppress(OSError):
            for path in self.folder.glob(f".*{NEW_SUFFIX}"):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    if now - os.fstat(fd).st_mtime > ABANDONED_AFTER_S:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        path.unlink(missing_ok=True)
                except OSError:
                    pass
                finally:
                    os.close(fd)

    def discard(self, segment: Segment) -> None:
        """Its records are in the database: remove it (unlink first, so nobody adopts it again)."""
        size = 0
        try:
            with contextlib.suppress(OSError):
                size = os.fstat(segment.fd).st_size
            segment.path.unlink(missing_ok=True)
        finally:
            os.close(segment.fd)
        with self._cond:
            self._folder_bytes = max(0, self._folder_bytes - size)

    def release(self, segment: Segment) -> None:
        """Give a segment back unforwarded (its records stay on disk for whoever adopts it)."""
        os.close(segment.fd)

    def after_fork(self) -> None:
        # The child inherited the parent's segment fd, and with it a share of its flock: closing the
        # child's copy keeps the parent's segment adoptable once the parent is gone.
        active = self._active
        self._cond = threading.Condition()
        self._active = None
        self._syncing = False
        self._syncer = None
        self._written = self._synced = 0
        self._grown, self._measured_at = 0, -1e9
        if active is not None and self._pid != os.getpid():
            with contextlib.suppress(OSError):
                os.close(active.fd)
        self._pid = os.getpid()

    def _segment(self) -> Segment:
        # Called with the lock held. Opened lazily, in the process that writes (gunicorn forks first).
        if self._active is not None and self._pid == os.getpid():
            return self._active
        self._pid = os.getpid()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{os.getpid()}-{uuid.uuid4().hex}"
        # Created under a name `adopt` never looks at, locked, and only then renamed to a segment's
        # name: a segment name is never seen unlocked while its writer lives. (Created under its
        # final name, a forwarder listing the folder in the instant between open and flock — this
        # process's own or another's — took the new, empty file for an orphan, locked it first,
        # and this writer's flock failed with EAGAIN: a 503.)
        new = self.folder / f".{name}{NEW_SUFFIX}"
        path = self.folder / f"{name}{SUFFIX}"
        fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _pwrite_all(fd, bytes(WRITE_AHEAD), 0)  # its first records' space, synced with its name
            if self.fsync:
                os.fdatasync(fd)
            os.rename(new, path)
            if self.fsync:
                _sync_folder(self.folder)  # the new file's name must survive a power cut too
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                new.unlink()
            raise
        self._active = Segment(path, fd, 0, end=WRITE_AHEAD)
        return self._active

    def prepare(self) -> None:
        """Make the next segment now, if there is none (the forwarder, after sealing one): the answer
        that writes the next record does not wait for a file to be created and its name synced."""
        with self._cond:
            if self._active is None or self._pid != os.getpid():
                with contextlib.suppress(OSError):  # the next append tries again, and reports it
                    self._segment()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""A throwaway PostgreSQL server for the store tests: initdb + pg_ctl in a temporary directory.

Debian's `postgresql` package puts the server binaries in /usr/lib/postgresql/<version>/bin (not on
PATH). PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user
(or `nobody`). Durability is switched off: these databases live for one test session.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

# The cluster's files live in memory where the machine has a RAM disk: each test's database is a copy
# of the template (~8 MB), and on disk creating ~100 of them and deleting 1.2 GB at the end of the
# session took about a minute (the slow session teardown).
_RAM_DISK = Path("/dev/shm")


def server_binaries() -> Path | None:
    """The newest folder holding initdb and pg_ctl, or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for folder in candidates:
        if all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def _version(folder: str) -> float:
    try:
        return float(Path(folder).parent.name)
    except ValueError:
        return 0.0


def _server_user() -> str | None:
    """The account to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` account exists")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresCluster:
    bin_dir: Path
    root: Path
    port: int
    user: str | None
    _names: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def _strategy(self) -> str:
        """` STRATEGY = FILE_COPY` where the server has it (PostgreSQL 15+, /usr/lib/postgresql/<v>/bin)."""
        version = self.bin_dir.parent.name
        return " STRATEGY = FILE_COPY" if version.isdigit() and int(version) >= 15 else ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://cds@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            user=self.user,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def start(self) -> None:
        init = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "cds",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-1000:]}")
        self.resume()

    def resume(self) -> None:
        """Start the server on the existing data folder (after `halt`)."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        started = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        if started.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()} {log}")

    def halt(self) -> None:
        """Stop the server, keeping its data (a database outage); `resume` brings it back."""
        done = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {done.stderr.strip()}")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh, empty database: each test gets its own schema history."""
        name = f"t{os.getpid()}_{next(self._names)}"
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                # FILE_COPY copies the template's files instead of WAL-logging every page (PostgreSQL 15's default).
                conn.execute(text(f'CREATE DATABASE "{name}"{self._strategy}'))
        finally:
            engine.dispose()
        return self.url(name)


def start_cluster(bin_dir: Path) -> PostgresCluster:
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="cds-pg-", dir=_RAM_DISK if _RAM_DISK.is_dir() else None))
    if user is not None:
        shutil.chown(root, user=user)
    cluster = PostgresCluster(bin_dir=bin_dir, root=root, port=_free_port(), user=user)
    try:
        cluster.start()
    except Exception:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster

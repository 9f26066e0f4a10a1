"""A private PostgreSQL for tests and benchmarks: Debian's server binaries, `initdb` into a temporary
folder, on a free loopback port, as agent/devtools/local_broker.py starts Mosquitto. The tests start
one per session (tests/pg.py) and give each test a database of its own (`fresh_database`).

`initdb` and `postgres` refuse to run as root: as root they run as the `postgres` user (the Debian
package makes it) in a folder that user owns. `make deps` installs the binaries.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

INITDB_OPTIONS = ["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]
# Durability is not under test here: no fsync, so a test session's server costs little disk time.
SERVER_OPTIONS = ["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"]
SERVER_OPTIONS += ["-c", "max_connections=200"]
BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL server's bin folder, or None."""
    for folder in BIN_DIRS:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    found = shutil.which("initdb")
    return Path(found).parent if found and (Path(found).parent / "postgres").is_file() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One `postgres` process with trust authentication on 127.0.0.1 (tests only: fsync off)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError(
                    "running as root needs the `postgres` user (apt-get install postgresql)"
                ) from exc
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def start(self) -> PostgresServer:
        subprocess.run(
            [*self._as, str(self.bin_dir / "initdb"), "-D", str(self.data), *INITDB_OPTIONS],
            check=True,
            capture_output=True,
            timeout=120,
        )
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    *self._as,
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data),
                    *self._where(),
                    *SERVER_OPTIONS,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:  # until it accepts a connection (or dies)
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def _where(self) -> list[str]:
        """Loopback TCP on our port, and the socket in our own folder (not /var/run/postgresql)."""
        return ["-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.folder)]

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def fresh_database(self) -> str:
        """A new, empty database; its postgresql:// URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)

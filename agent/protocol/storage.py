"""A database written by one thread in batches: the agent's metrics.db and the console's fleet history.

Both sides keep rows in memory (callers never block on the disk) and hand them to one writer thread,
which owns its connection (SQLite connections are per thread), writes a batch per `flush_interval_s`
in one transaction and prunes about once a minute. The agent writes SQLite through sqlite-utils; the
console overrides `connect`/`disconnect` with its SQLAlchemy engine (SQLite or PostgreSQL). WAL and
busy_timeout let readers (`sqlite3` on the device, the console's API threads) in while it writes.
A table made by an older version gets the columns it lacks: a schema change migrates instead of
failing every insert.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import sqlite_utils

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0
Conn = TypeVar("Conn")


def open_db(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=10000")
    return db


def ensure_table(
    db: sqlite_utils.Database,
    name: str,
    columns: dict[str, type],
    indexes: Sequence[Sequence[str]] = (),
    pk: str | None = None,
) -> None:
    """Create the table with its indexes, or add the columns an older version's table lacks (rows
    written before keep NULL there)."""
    table = db.table(name)
    if not table.exists():
        table.create(columns, pk=pk)
        for index in indexes:
            table.create_index(list(index))
        return
    have = set(table.columns_dict)
    for column, kind in columns.items():
        if column not in have:
            log.info(
                "%s: adding column %s to %s",
                db.conn.execute("PRAGMA database_list").fetchone()[2],
                column,
                name,
            )
            table.add_column(column, kind)


class BatchWriter(Generic[Conn]):
    """The writer thread: subclasses say what the schema is (`create_schema`), what one batch writes
    (`flush`) and what retention deletes (`prune`); each is called with the thread's connection,
    a sqlite-utils Database unless `connect`/`disconnect` say otherwise."""

    thread_name = "db-writer"

    def __init__(self, path: Path, flush_interval_s: float) -> None:
        self.path = path
        self.flush_interval_s = flush_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> Conn:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db: Any = open_db(self.path)
        return db  # a sqlite-utils Database: the Conn of writers that keep the default

    def disconnect(self, db: Conn) -> None:
        db.conn.close()  # type: ignore[attr-defined]

    def create_schema(self, db: Conn) -> None:
        raise NotImplementedError

    def flush(self, db: Conn) -> None:
        raise NotImplementedError

    def prune(self, db: Conn) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Create the schema now, so a bad path fails at start, then run the writer thread."""
        db = self.connect()
        try:
            self.create_schema(db)
        finally:
            self.disconnect(db)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued and close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)

    def _run(self) -> None:
        db = self.connect()
        last_prune = 0.0
        try:
            while not self._stop.wait(self.flush_interval_s):
                self.flush(db)
                if time.monotonic() - last_prune > PRUNE_EVERY_S:
                    self.prune(db)
                    last_prune = time.monotonic()
            self.flush(db)
        finally:
            self.disconnect(db)

"""Per-inference metrics in SQLite (sqlite-utils): one row per frame, written in batches.

Workers hand rows to a thread-safe queue; one writer thread owns the connection (SQLite connections
are per thread), inserts in batches every `flush_interval_s`, and deletes rows past the retention
or, oldest first, beyond the size bound (freed pages are reused, so the file stops growing there).
WAL and busy_timeout let `sqlite3 metrics.db` readers in while the agent writes. A database made by
an older version gets the columns it lacks (a schema change migrates, it does not fail every insert).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import sqlite_utils

log = logging.getLogger(__name__)

COLUMNS: dict[str, type] = {
    "ts": float,
    "request_id": str,
    "model": str,
    "backend": str,
    "device": str,
    "instance": int,
    "queue_ms": float,
    "preprocess_ms": float,
    "infer_ms": float,
    "total_ms": float,
    "status": str,
}
MAX_PENDING = 100_000  # rows held in memory if the disk stalls; beyond that rows are counted as lost


def open_db(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=10000")
    return db


class MetricsStore:
    def __init__(
        self,
        path: Path,
        retention_s: float,
        flush_interval_s: float = 1.0,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.path = path
        self.retention_s = retention_s
        self.flush_interval_s = flush_interval_s
        self.max_bytes = max_bytes
        self._rows: queue.Queue[dict[str, Any]] = queue.Queue(MAX_PENDING)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.lost = 0

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = open_db(self.path)  # create the schema now so a bad state dir fails at start
        self._ensure_schema(db)
        db.conn.close()
        self._thread = threading.Thread(target=self._run, name="metrics-writer", daemon=True)
        self._thread.start()

    @staticmethod
    def _ensure_schema(db: sqlite_utils.Database) -> None:
        table = db.table("inferences")
        if not table.exists():
            table.create(COLUMNS, pk=None)
            table.create_index(["ts"])
            table.create_index(["request_id"])
            return
        have = set(table.columns_dict)
        for name, kind in COLUMNS.items():
            if name not in have:  # made by an older version: rows written before stay, with NULL here
                log.info(
                    "metrics: adding column %s to %s",
                    name,
                    db.conn.execute("PRAGMA database_list").fetchone()[2],
                )
                table.add_column(name, kind)

    def record(self, row: dict[str, Any]) -> None:
        """Thread-safe, non-blocking."""
        try:
            self._rows.put_nowait(row)
        except queue.Full:
            self.lost += 1

    def _drain(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while True:
            try:
                rows.append(self._rows.get_nowait())
            except queue.Empty:
                return rows

    def _run(self) -> None:
        db = open_db(self.path)
        last_prune = 0.0
        try:
            while not self._stop.wait(self.flush_interval_s):
                self._flush(db)
                if time.monotonic() - last_prune > 60.0:
                    self._prune(db)
                    last_prune = time.monotonic()
            self._flush(db)
        finally:
            db.conn.close()

    def _flush(self, db: sqlite_utils.Database) -> None:
        rows = self._drain()
        if not rows:
            return
        try:
            with db.conn:  # one transaction per batch
                db.table("inferences").insert_all(rows, batch_size=500)
            self.written += len(rows)
        except sqlite3.Error:
            log.exception("metrics: could not write %d rows", len(rows))
            self.lost += len(rows)

    def _prune(self, db: sqlite_utils.Database) -> None:
        cutoff = time.time() - self.retention_s
        try:
            with db.conn:
                db.execute("DELETE FROM inferences WHERE ts < ?", [cutoff])
            self._bound_size(db)
        except sqlite3.Error:
            log.exception("metrics: retention delete failed")

    def used_bytes(self, db: sqlite_utils.Database) -> int:
        """Bytes in use by the database (pages minus free pages: the file's size once it is full)."""
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def _bound_size(self, db: sqlite_utils.Database) -> None:
        """Delete the oldest rows until the data fits in 90% of `max_bytes` (room to grow before the
        next check, without deleting on every one)."""
        used = self.used_bytes(db)
        if used <= self.max_bytes:
            return
        rows = db.execute("SELECT COUNT(*) FROM inferences").fetchone()[0]
        if not rows:
            return
        excess = used - int(self.max_bytes * 0.9)
        drop = min(rows, int(excess / (used / rows)) + 1)
        with db.conn:
            db.execute(
                "DELETE FROM inferences WHERE rowid IN (SELECT rowid FROM inferences ORDER BY ts LIMIT ?)",
                [drop],
            )
        log.info("metrics: %s over %d MB: deleted the oldest %d rows", self.path, self.max_bytes >> 20, drop)

    def stop(self) -> None:
        """Flush what is queued and close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)

"""Per-inference metrics in SQLite (sqlite-utils): one row per frame, written in batches.

Workers hand rows to a thread-safe queue; the writer thread (agent/protocol/storage.py, shared with
the console) inserts them in batches every `flush_interval_s`, and deletes rows past the retention
or, oldest first, beyond the size bound (freed pages are reused, so the file stops growing there).
WAL and busy_timeout let `sqlite3 metrics.db` readers in while the agent writes. A database made by
an older version gets the columns it lacks (a schema change migrates, it does not fail every insert).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.protocol.storage import BatchWriter, ensure_table

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


class MetricsStore(BatchWriter):
    thread_name = "metrics-writer"

    def __init__(
        self,
        path: Path,
        retention_s: float,
        flush_interval_s: float = 1.0,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        super().__init__(path, flush_interval_s)
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self._rows: queue.Queue[dict[str, Any]] = queue.Queue(MAX_PENDING)
        self.written = 0
        self.lost = 0

    def create_schema(self, db: sqlite_utils.Database) -> None:
        ensure_table(db, "inferences", COLUMNS, indexes=[["ts"], ["request_id"]])

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

    def flush(self, db: sqlite_utils.Database) -> None:
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

    def prune(self, db: sqlite_utils.Database) -> None:
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

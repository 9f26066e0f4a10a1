"""Where rollouts and console-assigned device tags are kept: a small interface, and SQLite behind it.

The engine needs four calls, all blocking (it runs them through asyncio.to_thread), so another
database (a PostgreSQL store for several console processes) only has to implement `RolloutStore`.
The SQLite one shares the console's database file (WAL: the history writer and the readers go on
meanwhile); a rollout is one row holding its record as JSON, written whole on every change, which
is what lets a restarted console carry on exactly where it was.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Protocol

import sqlite_utils

from agent.protocol.storage import ensure_table, open_db

ROLLOUT_COLUMNS: dict[str, type] = {
    "id": str,
    "state": str,
    "created": float,
    "updated": float,
    "document": str,
}
TAG_COLUMNS: dict[str, type] = {"device_id": str, "tags": str, "updated": float}


class RolloutStore(Protocol):
    def open(self) -> None: ...

    def close(self) -> None: ...

    def load(self) -> list[str]:
        """Every rollout's JSON record, oldest first."""
        ...

    def save(self, rollout_id: str, state: str, created: float, updated: float, document: str) -> None: ...

    def tags(self) -> dict[str, dict[str, str]]:
        """Console-assigned tags by device id."""
        ...

    def set_tags(self, device_id: str, tags: dict[str, str], updated: float) -> None: ...


class SqliteRolloutStore:
    """Tables `rollouts` and `device_tags` in the console's SQLite database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite_utils.Database | None = None

    def open(self) -> None:
        with self._lock:
            self._db = open_db(self.path)
            ensure_table(self._db, "rollouts", ROLLOUT_COLUMNS, [["state"]], pk="id")
            ensure_table(self._db, "device_tags", TAG_COLUMNS, pk="device_id")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.conn.close()
                self._db = None

    def _conn(self) -> sqlite_utils.Database:
        if self._db is None:
            raise RuntimeError("rollout store is not open")
        return self._db

    def load(self) -> list[str]:
        with self._lock:
            rows = self._conn().execute("SELECT document FROM rollouts ORDER BY created").fetchall()
        return [row[0] for row in rows]

    def save(self, rollout_id: str, state: str, created: float, updated: float, document: str) -> None:
        row = {"id": rollout_id, "state": state, "created": created, "updated": updated, "document": document}
        with self._lock:
            db = self._conn()
            with db.conn:
                db.table("rollouts").upsert(row, pk="id")

    def tags(self) -> dict[str, dict[str, str]]:
        with self._lock:
            rows = self._conn().execute("SELECT device_id, tags FROM device_tags").fetchall()
        return {device_id: json.loads(tags) for device_id, tags in rows}

    def set_tags(self, device_id: str, tags: dict[str, str], updated: float) -> None:
        with self._lock:
            db = self._conn()
            with db.conn:
                if tags:
                    row = {
                        "device_id": device_id,
                        "tags": json.dumps(tags, sort_keys=True),
                        "updated": updated,
                    }
                    db.table("device_tags").upsert(row, pk="device_id")
                else:
                    db.execute("DELETE FROM device_tags WHERE device_id = ?", [device_id])

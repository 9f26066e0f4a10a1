"""The console's fleet history in SQLite (sqlite-utils): devices, telemetry, placements published.

The event loop only appends rows to an in-memory batch (cheap, non-blocking). The writer thread
(agent/protocol/storage.py, shared with the agent's metrics.db) inserts a batch per
`flush_interval_s` in one transaction, coalesces device rows (latest status wins) and deletes
telemetry past the retention. WAL lets the readers (API requests, run in threads) read while the
writer writes; busy_timeout covers the short moments they still collide. The telemetry columns come
from the telemetry schema: a counter added there gets its column, added to an existing database too.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.protocol.schemas import DeviceCounters, Telemetry, TenantCounters
from agent.protocol.storage import BatchWriter, ensure_table, open_db

log = logging.getLogger(__name__)

TELEMETRY_COLUMNS: dict[str, type] = {
    "ts": float,
    "device_id": str,
    "model": str,
    "backend": str,
    "device": str,
    "state": str,
    "instances": int,
    "fps": float,
    "p50_ms": float,
    "p95_ms": float,
    "p99_ms": float,
    "queue_depth": int,
    **dict.fromkeys(TenantCounters.model_fields, int),
    "batch_size_mean": float,
}
HOST_COLUMNS: dict[str, type] = {
    "ts": float,
    "device_id": str,
    "cpu_percent": float,
    "rss_mb": float,
    "temperature_c": float,
    "load_1m": float,
    **dict.fromkeys(DeviceCounters.model_fields, int),
}
DEVICE_COLUMNS: dict[str, type] = {
    "device_id": str,
    "online": int,
    "first_seen": float,
    "last_seen": float,
    "status_json": str,
}
PLACEMENT_COLUMNS: dict[str, type] = {
    "id": int,
    "ts": float,
    "device_id": str,
    "generation": int,
    "user": str,
    "action": str,
    "document": str,
}
MAX_PENDING_ROWS = 500_000  # held in memory if the disk stalls; beyond that rows are counted as lost


def ensure_schema(db: sqlite_utils.Database) -> None:
    by_device_and_time = [["device_id", "ts"], ["ts"]]
    ensure_table(db, "telemetry", TELEMETRY_COLUMNS, by_device_and_time)
    ensure_table(db, "host_metrics", HOST_COLUMNS, by_device_and_time)
    ensure_table(db, "devices", DEVICE_COLUMNS, pk="device_id")
    ensure_table(db, "placements", PLACEMENT_COLUMNS, [["device_id", "ts"]], pk="id")


def telemetry_rows(device_id: str, telemetry: Telemetry) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One telemetry message as rows: one per tenant, and the device's own."""
    ts = telemetry.ts
    tenants = [
        {
            "ts": ts,
            "device_id": device_id,
            "model": t.model,
            "backend": t.backend,
            "device": t.device,
            "state": t.state,
            "instances": t.instances,
            "fps": t.fps,
            "p50_ms": t.latency_ms.p50,
            "p95_ms": t.latency_ms.p95,
            "p99_ms": t.latency_ms.p99,
            "queue_depth": t.queue_depth,
            **{name: getattr(t, name) for name in TenantCounters.model_fields},
            "batch_size_mean": t.batch_size_mean,
        }
        for t in telemetry.tenants
    ]
    host = {
        "ts": ts,
        "device_id": device_id,
        "cpu_percent": telemetry.device.cpu_percent,
        "rss_mb": telemetry.device.rss_mb,
        "temperature_c": telemetry.device.temperature_c,
        "load_1m": telemetry.device.load_1m,
        **{name: getattr(telemetry, name) for name in DeviceCounters.model_fields},
    }
    return tenants, host


class ConsoleStore(BatchWriter):
    thread_name = "console-db-writer"

    def __init__(self, path: Path, retention_s: float, flush_interval_s: float = 1.0) -> None:
        super().__init__(path, flush_interval_s)
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._telemetry: list[dict[str, Any]] = []
        self._hosts: list[dict[str, Any]] = []
        self._devices: dict[str, dict[str, Any]] = {}
        self._placements: list[dict[str, Any]] = []
        self._forget: set[str] = set()
        self._read_lock = threading.Lock()
        self._read_db: sqlite_utils.Database | None = None
        self.written = 0
        self.lost = 0
        self.last_flush_ms = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    def create_schema(self, db: sqlite_utils.Database) -> None:
        ensure_schema(db)

    def start(self) -> None:
        super().start()
        self._read_db = open_db(self.path)

    def stop(self) -> None:
        """Flush what is queued and close."""
        super().stop()
        with self._read_lock:
            if self._read_db is not None:
                self._read_db.conn.close()
                self._read_db = None

    # -- writes (called on the event loop: never block) -----------------------------------------
    def pending(self) -> int:
        with self._lock:
            return len(self._telemetry) + len(self._hosts) + len(self._devices) + len(self._placements)

    def add_telemetry(self, device_id: str, telemetry: Telemetry) -> None:
        tenants, host = telemetry_rows(device_id, telemetry)
        with self._lock:
            if len(self._telemetry) >= MAX_PENDING_ROWS:
                self.lost += 1
                return
            self._telemetry.extend(tenants)
            self._hosts.append(host)

    def put_device(
        self, device_id: str, online: bool, first_seen: float, last_seen: float, status: str
    ) -> None:
        row = {
            "device_id": device_id,
            "online": int(online),
            "first_seen": first_seen,
            "last_seen": last_seen,
            "status_json": status,
        }
        with self._lock:
            self._devices[device_id] = row  # coalesced: the latest wins
            self._forget.discard(device_id)

    def forget_device(self, device_id: str) -> None:
        """The device's retained status was cleared: it left the fleet."""
        with self._lock:
            self._devices.pop(device_id, None)
            self._forget.add(device_id)

    def add_placement(self, device_id: str, generation: int, user: str, action: str, document: str) -> None:
        row = {
            "ts": time.time(),
            "device_id": device_id,
            "generation": generation,
            "user": user,
            "action": action,
            "document": document,
        }
        with self._lock:
            self._placements.append(row)

    # -- writer thread ---------------------------------------------------------------------------
    def flush(self, db: sqlite_utils.Database) -> None:
        with self._lock:
            telemetry, self._telemetry = self._telemetry, []
            hosts, self._hosts = self._hosts, []
            devices, self._devices = self._devices, {}
            placements, self._placements = self._placements, []
            forget, self._forget = self._forget, set()
        count = len(telemetry) + len(hosts) + len(devices) + len(placements) + len(forget)
        if not count:
            return
        started = time.perf_counter()
        try:
            with db.conn:  # one transaction per batch
                if telemetry:
                    db.table("telemetry").insert_all(telemetry, batch_size=1000)
                if hosts:
                    db.table("host_metrics").insert_all(hosts, batch_size=1000)
                if devices:
                    db.table("devices").upsert_all(list(devices.values()), pk="device_id", batch_size=500)
                if placements:
                    db.table("placements").insert_all(placements)
                for device_id in forget:
                    db.execute("DELETE FROM devices WHERE device_id = ?", [device_id])
            self.written += count
        except sqlite3.Error:
            log.exception("console db: could not write %d rows", count)
            self.lost += count
        self.last_flush_ms = (time.perf_counter() - started) * 1000.0

    def prune(self, db: sqlite_utils.Database) -> None:
        cutoff = time.time() - self.retention_s
        try:
            with db.conn:
                db.execute("DELETE FROM telemetry WHERE ts < ?", [cutoff])
                db.execute("DELETE FROM host_metrics WHERE ts < ?", [cutoff])
                db.execute("DELETE FROM placements WHERE ts < ?", [cutoff])
        except sqlite3.Error:
            log.exception("console db: retention delete failed")

    # -- reads (blocking: call them through asyncio.to_thread) ----------------------------------
    def _query(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        with self._read_lock:
            if self._read_db is None:
                return []
            cursor = self._read_db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def telemetry_since(self, device_id: str, since: float, limit: int = 20_000) -> list[dict[str, Any]]:
        return self._query(
            "SELECT ts, model, backend, device, state, fps, p50_ms, p95_ms, p99_ms, queue_depth, drops,"
            " errors FROM telemetry WHERE device_id = ? AND ts >= ? ORDER BY ts LIMIT ?",
            [device_id, since, limit],
        )

    def placements_of(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        return self._query(
            "SELECT ts, generation, user, action, document FROM placements WHERE device_id = ?"
            " ORDER BY id DESC LIMIT ?",
            [device_id, limit],
        )

    def known_devices(self) -> list[dict[str, Any]]:
        return self._query("SELECT device_id, online, first_seen, last_seen, status_json FROM devices", [])

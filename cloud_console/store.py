"""The console's fleet history: devices, telemetry, host metrics, placements published (cloud_console/db.py).

The event loop only appends rows to an in-memory batch (cheap, non-blocking). The writer thread
(agent/protocol/storage.py, shared with the agent's metrics.db) inserts a batch per
`flush_interval_s` in one transaction and coalesces device rows (latest status wins). About once a
minute one process (a lease, when several share a PostgreSQL database) keeps the history bounded:
raw telemetry older than `downsample_after_s` becomes one row per device, tenant and
`downsample_bucket_s` (means; counters and queue depth take the bucket's last/largest value), rows
past the retention go, and past `max_rows` the oldest go. On SQLite, WAL lets the readers (API
requests, run in threads) read while the writer writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sq
from sqlalchemy.engine import Connection, Engine

from agent.protocol.schemas import DeviceCounters, Telemetry, TenantCounters
from agent.protocol.storage import BatchWriter
from cloud_console import db as schema
from cloud_console.db import HOST_COLUMNS, TELEMETRY_COLUMNS, Lease, migrate, open_engine, upsert
from cloud_console.shared_telemetry import forget_latest, latest_row, write_latest

log = logging.getLogger(__name__)

__all__ = ["HOST_COLUMNS", "TELEMETRY_COLUMNS", "ConsoleStore", "telemetry_rows"]

MAX_PENDING_ROWS = 500_000  # held in memory if the database stalls; beyond that rows are counted as lost


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
            "span_s": 0.0,
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
        "span_s": 0.0,
    }
    return tenants, host


# How a bucket of raw rows becomes one row: (aggregate, columns). Counters count since the tenant
# started, so the bucket's largest is its last; everything else not listed is grouped on.
_TENANT_AGG: dict[str, str] = {
    **dict.fromkeys(["fps", "p50_ms", "p95_ms", "batch_size_mean", "instances"], "avg"),
    **dict.fromkeys(["p99_ms", "queue_depth", *TenantCounters.model_fields], "max"),
    "state": "max",
}
_HOST_AGG: dict[str, str] = {
    **dict.fromkeys(["cpu_percent", "rss_mb", "temperature_c", "load_1m"], "avg"),
    **dict.fromkeys(DeviceCounters.model_fields, "max"),
}


def downsample(conn: Connection, table: sa.Table, agg: dict[str, str], before: float, bucket_s: float) -> int:
    """Replace the raw rows older than `before` by one row per device (and tenant) and bucket.
    Returns how many raw rows went."""
    c = table.c
    before = (before // bucket_s) * bucket_s  # whole buckets only: a bucket is never split in two
    raw = sa.and_(c.ts < before, sa.or_(c.span_s == 0, c.span_s.is_(None)))
    width: sa.ColumnElement[float] = sa.literal_column(
        repr(float(bucket_s))
    )  # inline, so GROUP BY matches the SELECT
    if conn.dialect.name == "postgresql":
        bucket = sa.func.floor(c.ts / width) * width
    else:  # SQLite's floor() needs a build with math functions; CAST truncates (ts > 0)
        bucket = sa.cast(c.ts / width, sa.Integer) * width
    keys = [col for col in table.columns if col.name not in agg and col.name not in ("ts", "span_s")]
    columns: list[Any] = [bucket.label("ts")]
    names = ["ts"]
    for col in table.columns:
        if col.name in ("ts", "span_s"):
            continue
        if col.name in agg:
            fn = getattr(sa.func, agg[col.name])
            value = fn(col)
            if isinstance(col.type, (sa.Integer, sa.BigInteger)) and agg[col.name] == "avg":
                value = sa.func.round(value)
            columns.append(sa.cast(value, col.type).label(col.name))
        else:
            columns.append(col)
        names.append(col.name)
    columns.append(width.label("span_s"))
    names.append("span_s")
    select = sa.select(*columns).where(raw).group_by(bucket, *keys)
    # Aggregate aside, delete, then insert: a bucket row may share (device, ts) with a raw row it
    # replaces, and host rows are unique on that pair.
    query = select.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    conn.execute(sa.text(f"CREATE TEMPORARY TABLE downsampled AS {query}"))
    gone = int(conn.execute(sa.delete(table).where(raw)).rowcount)
    listed = ", ".join(names)
    conn.execute(sa.text(f"INSERT INTO {table.name} ({listed}) SELECT {listed} FROM downsampled"))  # noqa: S608
    conn.execute(sa.text("DROP TABLE downsampled"))
    return gone


class ConsoleStore(BatchWriter[Connection]):
    thread_name = "console-db-writer"

    def __init__(
        self,
        database: Engine | str | Path,
        retention_s: float,
        flush_interval_s: float = 1.0,
        *,
        downsample_after_s: float | None = None,
        downsample_bucket_s: float = 60.0,
        max_rows: int | None = None,
    ) -> None:
        self.engine = database if isinstance(database, Engine) else open_engine(database)
        super().__init__(Path(self.engine.url.database or "."), flush_interval_s)
        self.retention_s = retention_s
        self.downsample_after_s = downsample_after_s
        self.downsample_bucket_s = downsample_bucket_s
        self.max_rows = max_rows
        self.maintenance = Lease(self.engine, "history-maintenance", ttl_s=180.0)
        self._lock = threading.Lock()
        self._telemetry: list[dict[str, Any]] = []
        self._hosts: list[dict[str, Any]] = []
        self._devices: dict[str, dict[str, Any]] = {}
        self._placements: list[dict[str, Any]] = []
        # Placements taken by the writer and not yet committed: the audit log reads them from here
        # meanwhile, so a placement is listed as soon as it is published (read your writes).
        self._placements_writing: list[dict[str, Any]] = []
        self._forget: set[str] = set()
        # Several processes (a shared group): each device's latest message is also kept in the
        # database, in the name of this process, for the others' fleet rows (shared_telemetry.py).
        self.share_as: str | None = None
        self._latest: dict[str, dict[str, Any]] = {}
        self.written = 0
        self.lost = 0
        self.last_flush_ms = 0.0
        self.downsampled = 0
        self.duplicates = 0  # messages delivered again and not stored twice
        # Rows added now land in batch `batch`; `on_commit(n)` (from the writer thread) says every
        # batch up to n is in the database: the MQTT side acknowledges their messages then.
        self.batch = 0
        self.on_commit: Callable[[int], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def connect(self) -> Connection:
        return self.engine.connect()

    def disconnect(self, db: Connection) -> None:
        db.close()

    def create_schema(self, db: Connection) -> None:
        migrate(self.engine)  # in a transaction of its own (and a lock on PostgreSQL)

    # -- writes (called on the event loop: never block) -----------------------------------------
    def pending(self) -> int:
        with self._lock:
            return len(self._telemetry) + len(self._hosts) + len(self._devices) + len(self._placements)

    def add_telemetry(
        self, device_id: str, telemetry: Telemetry, payload: bytes | None = None, received_at: float = 0.0
    ) -> None:
        tenants, host = telemetry_rows(device_id, telemetry)
        with self._lock:
            if len(self._telemetry) >= MAX_PENDING_ROWS:
                self.lost += 1
                return
            self._telemetry.extend(tenants)
            self._hosts.append(host)
            if self.share_as is not None and payload is not None:
                held = self._latest.get(device_id)
                if held is None or held["ts"] < telemetry.ts:
                    self._latest[device_id] = latest_row(
                        device_id, telemetry.ts, received_at, self.share_as, payload
                    )

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
            self._latest.pop(device_id, None)
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
    def batch_number(self) -> int:
        """The batch rows added now will be written in (the event loop's side of `on_commit`)."""
        return self.batch

    def flush(self, db: Connection) -> None:
        with self._lock:
            batch = self.batch
            self.batch += 1
            telemetry, self._telemetry = self._telemetry, []
            hosts, self._hosts = self._hosts, []
            devices, self._devices = self._devices, {}
            placements, self._placements = self._placements, []
            self._placements_writing = placements
            forget, self._forget = self._forget, set()
            latest, self._latest = self._latest, {}
        count = len(telemetry) + len(hosts) + len(devices) + len(placements) + len(forget)
        if not count:
            self._committed(batch)
            return
        started = time.perf_counter()
        try:
            with db.begin():  # one transaction per batch
                if db.dialect.name == "postgresql":
                    self._copy_new(db, hosts, telemetry)
                else:
                    self._insert_new(db, hosts, telemetry)
                if devices:
                    # Every process following status writes the same row: first_seen stays the first.
                    rows = sorted(devices.values(), key=lambda r: r["device_id"])  # one lock order
                    if db.dialect.name == "postgresql":
                        self._copy_devices(db, rows)
                    else:
                        upsert(
                            db, schema.devices, rows, ["device_id"], ["online", "last_seen", "status_json"]
                        )
                if placements:
                    db.execute(sa.insert(schema.placements), placements)
                if forget:
                    db.execute(sa.delete(schema.devices).where(schema.devices.c.device_id.in_(forget)))
                    forget_latest(db, forget)
                write_latest(db, list(latest.values()))  # last: its stored_at is close to the commit
            self.written += count
            with self._lock:
                self._placements_writing = []
            self._committed(batch)
        except sa.exc.SQLAlchemyError:
            # Not acknowledged: with a shared group the broker sends these messages again.
            log.exception("console db: could not write %d rows", count)
            self.lost += count
        self.last_flush_ms = (time.perf_counter() - started) * 1000.0

    def _insert_new(
        self, db: Connection, hosts: list[dict[str, Any]], telemetry: list[dict[str, Any]]
    ) -> None:
        """SQLite: the host rows not stored yet (a message sent again, its ack lost with a killed
        process, is there already), then the tenant rows of those messages."""
        h = schema.host_metrics
        done = sq.insert(h).on_conflict_do_nothing(index_elements=["device_id", "ts"])
        fresh = (
            {(d, float(ts)) for d, ts in db.execute(done.returning(h.c.device_id, h.c.ts), hosts)}
            if hosts
            else set()
        )
        if len(fresh) < len(hosts):
            self.duplicates += len(hosts) - len(fresh)
            telemetry = [r for r in telemetry if (r["device_id"], float(r["ts"])) in fresh]
        if telemetry:
            db.execute(sa.insert(schema.telemetry), telemetry)

    def _copy_new(self, db: Connection, hosts: list[dict[str, Any]], telemetry: list[dict[str, Any]]) -> None:
        """PostgreSQL: COPY, faster than INSERTs (measured on a busy 2-core machine, 2,000 messages
        or 5,000 rows: 0.3-0.5 s against 0.9-2.6 s with executemany). Host rows go through a
        temporary table so that a message sent again is skipped (ON CONFLICT); then the tenant rows
        of the messages that were new."""
        raw: Any = db.connection.driver_connection  # the psycopg connection, in SQLAlchemy's transaction
        host_cols = list(HOST_COLUMNS)
        listed = ", ".join(host_cols)
        with raw.cursor() as cur:
            if hosts:
                cur.execute(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS incoming_hosts"
                    " (LIKE host_metrics INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                with cur.copy(f"COPY incoming_hosts ({listed}) FROM STDIN") as copy:
                    for row in hosts:
                        copy.write_row([row[c] for c in host_cols])
                cur.execute(
                    f"INSERT INTO host_metrics ({listed}) SELECT {listed} FROM incoming_hosts"  # noqa: S608
                    " ON CONFLICT (device_id, ts) DO NOTHING RETURNING device_id, ts"
                )
                fresh = {(d, float(ts)) for d, ts in cur.fetchall()}
                if len(fresh) < len(hosts):
                    self.duplicates += len(hosts) - len(fresh)
                    telemetry = [r for r in telemetry if (r["device_id"], float(r["ts"])) in fresh]
            if telemetry:
                tenant_cols = list(TELEMETRY_COLUMNS)
                with cur.copy(f"COPY telemetry ({', '.join(tenant_cols)}) FROM STDIN") as copy:
                    for row in telemetry:
                        copy.write_row([row[c] for c in tenant_cols])

    @staticmethod
    def _copy_devices(db: Connection, rows: list[dict[str, Any]]) -> None:
        """PostgreSQL: the device rows in one COPY and one INSERT ... ON CONFLICT. An executemany
        of 10,000 upserts took 15 s here: each round trip waits for the GIL the ingest loop holds."""
        raw: Any = db.connection.driver_connection
        cols = ["device_id", "online", "first_seen", "last_seen", "status_json"]
        listed = ", ".join(cols)
        with raw.cursor() as cur:
            cur.execute(
                "CREATE TEMPORARY TABLE IF NOT EXISTS incoming_devices (LIKE devices) ON COMMIT DELETE ROWS"
            )
            with cur.copy(f"COPY incoming_devices ({listed}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row([row[c] for c in cols])
            cur.execute(
                f"INSERT INTO devices ({listed}) SELECT {listed} FROM incoming_devices"  # noqa: S608
                " ORDER BY device_id ON CONFLICT (device_id) DO UPDATE SET online = EXCLUDED.online,"
                " last_seen = EXCLUDED.last_seen, status_json = EXCLUDED.status_json"
            )

    def _committed(self, batch: int) -> None:
        if self.on_commit is not None:
            try:
                self.on_commit(batch)
            except Exception:  # an event loop already closed at shutdown
                log.debug("commit of batch %d not passed on", batch, exc_info=True)

    def prune(self, db: Connection) -> None:
        """Retention, downsampling and the size bound: in one process of several (a lease)."""
        if not self.maintenance.held():
            return
        now = time.time()
        cutoff = now - self.retention_s
        try:
            with db.begin():
                for table in (schema.telemetry, schema.host_metrics, schema.placements):
                    db.execute(sa.delete(table).where(table.c.ts < cutoff))
                if self.downsample_after_s is not None:
                    before = now - self.downsample_after_s
                    bucket = self.downsample_bucket_s
                    self.downsampled += downsample(db, schema.telemetry, _TENANT_AGG, before, bucket)
                    self.downsampled += downsample(db, schema.host_metrics, _HOST_AGG, before, bucket)
                if self.max_rows is not None:
                    for table in (schema.telemetry, schema.host_metrics):
                        self._bound(db, table, self.max_rows)
        except sa.exc.SQLAlchemyError:
            log.exception("console db: retention delete failed")

    @staticmethod
    def _bound(db: Connection, table: sa.Table, max_rows: int) -> None:
        """Keep at most `max_rows` rows: the oldest beyond go."""
        total = db.scalar(sa.select(sa.func.count()).select_from(table)) or 0
        if total <= max_rows:
            return
        edge = db.scalar(sa.select(table.c.ts).order_by(table.c.ts).offset(total - max_rows).limit(1))
        if edge is not None:
            gone = db.execute(sa.delete(table).where(table.c.ts < edge)).rowcount
            log.info("console db: %s over %d rows, %d oldest removed", table.name, max_rows, gone)

    # -- reads (blocking: call them through asyncio.to_thread) ----------------------------------
    def _query(self, query: sa.Select[Any]) -> list[dict[str, Any]]:
        for attempt in (1, 2):  # a read that meets SQLite busy (a checkpoint) is tried once more
            try:
                with self.engine.connect() as conn:
                    return [dict(row) for row in conn.execute(query).mappings()]
            except sa.exc.OperationalError:
                if attempt == 2:
                    log.exception("console db: read failed")
            except sa.exc.SQLAlchemyError:
                log.exception("console db: read failed")
                break
        return []

    def telemetry_since(self, device_id: str, since: float, limit: int = 20_000) -> list[dict[str, Any]]:
        t = schema.telemetry.c
        columns = [t.ts, t.model, t.backend, t.device, t.state, t.fps, t.p50_ms, t.p95_ms, t.p99_ms]
        columns += [t.queue_depth, t.drops, t.errors, t.span_s]
        return self._query(
            sa.select(*columns).where(t.device_id == device_id, t.ts >= since).order_by(t.ts).limit(limit)
        )

    def placements_of(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first: the ones published and not yet written (the writer runs once a second), then
        the database's."""
        fields = ("ts", "generation", "user", "action", "document")
        with self._lock:
            pending = [
                {k: row[k] for k in fields}
                for row in [*self._placements_writing, *self._placements]
                if row["device_id"] == device_id
            ]
        p = schema.placements.c
        stored = self._query(
            sa.select(p.ts, p.generation, p.user, p.action, p.document)
            .where(p.device_id == device_id)
            .order_by(p.id.desc())
            .limit(limit)
        )
        seen = {(r["ts"], r["generation"], r["action"]) for r in stored}  # committed meanwhile
        fresh = [r for r in reversed(pending) if (r["ts"], r["generation"], r["action"]) not in seen]
        return (fresh + stored)[:limit]

    def known_devices(self) -> list[dict[str, Any]]:
        d = schema.devices.c
        return self._query(sa.select(d.device_id, d.online, d.first_seen, d.last_seen, d.status_json))

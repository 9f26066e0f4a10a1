"""Each device's latest telemetry, shared between the console processes of one database.

With a shared group (docs/console.md#several-console-processes) the broker hands each telemetry
message to one process, so a process's fleet rows would change with its own share only. Subscribing
every process to every message would double the MQTT decoding, the console's bottleneck at 2,000
messages a second (docs/console.md#measured-several-processes-on-postgresql). Instead the process that
stores a message also keeps it as the device's latest (this table, one row per device, in the
transaction that stores the batch; an older message never replaces a newer one), and every process
reads, every `REFRESH_S`, the rows the others wrote since its last read: first the device ids and
their `ts` (an indexed range on `stored_at`), then the payloads of those newer than what it holds.

`stored_at` is the database's clock (PostgreSQL), so the processes' clocks need not agree; a read
looks back `OVERLAP_S` before the newest `stored_at` it saw, since a transaction that started earlier
may commit later. Rows it already holds (same `ts`) cost a comparison, not a parse.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.dialects import sqlite as sq
from sqlalchemy.engine import Connection, Engine

from agent.protocol.schemas import Telemetry
from cloud_console import db as schema

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # how often a process reads what the others stored
OVERLAP_S = 5.0  # a write transaction that started before the last read and committed after it
FETCH_CHUNK = 1000  # payloads fetched per query

# On the console's metadata: created (if missing) by db.migrate with the other tables.
latest_telemetry = sa.Table(
    "latest_telemetry",
    schema.metadata,
    sa.Column("device_id", sa.Text(), primary_key=True),
    sa.Column("ts", sa.Float(), nullable=False),  # the message's own ts: the newest message wins
    sa.Column("received_at", sa.Float(), nullable=False),  # when the storing process received it
    sa.Column("stored_at", sa.Float(), nullable=False),  # the database's clock: the readers' cursor
    sa.Column("holder", sa.Text(), nullable=False),  # the process that stored it
    sa.Column("payload", sa.Text(), nullable=False),  # the message as received
    sa.Index("idx_latest_telemetry_stored_at", "stored_at"),
)
COLUMNS = ["device_id", "ts", "received_at", "holder", "payload"]


def latest_row(device_id: str, ts: float, received_at: float, holder: str, payload: bytes) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "ts": ts,
        "received_at": received_at,
        "holder": holder,
        "payload": payload.decode(errors="replace"),
    }


def write_latest(db: Connection, rows: list[dict[str, Any]]) -> None:
    """Upsert the batch's latest message of each device (in the caller's transaction, last: its
    `stored_at` is then close to the commit). Sorted by device id: every process locks rows in one
    order."""
    if not rows:
        return
    rows = sorted(rows, key=lambda r: r["device_id"])
    t = latest_telemetry
    if db.dialect.name != "postgresql":  # SQLite: one process, one clock
        stmt = sq.insert(t)
        update = {c: stmt.excluded[c] for c in [*COLUMNS[1:], "stored_at"]}
        now = time.time()
        db.execute(
            stmt.on_conflict_do_update(
                index_elements=["device_id"], set_=update, where=t.c.ts < stmt.excluded.ts
            ),
            [{**r, "stored_at": now} for r in rows],
        )
        return
    # PostgreSQL: COPY into a temporary table, then one INSERT ... ON CONFLICT (an executemany of
    # thousands of upserts waits on the GIL the ingest loop holds at every round trip).
    raw: Any = db.connection.driver_connection
    listed = ", ".join(COLUMNS)
    with raw.cursor() as cur:
        cur.execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS incoming_latest"
            " (device_id text, ts float8, received_at float8, holder text, payload text)"
            " ON COMMIT DELETE ROWS"
        )
        with cur.copy(f"COPY incoming_latest ({listed}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[c] for c in COLUMNS])
        cur.execute(
            f"INSERT INTO latest_telemetry ({listed}, stored_at)"  # noqa: S608 - constants only
            f" SELECT {listed}, extract(epoch from clock_timestamp()) FROM incoming_latest ORDER BY device_id"
            " ON CONFLICT (device_id) DO UPDATE SET ts = EXCLUDED.ts, received_at = EXCLUDED.received_at,"
            " holder = EXCLUDED.holder, payload = EXCLUDED.payload, stored_at = EXCLUDED.stored_at"
            " WHERE latest_telemetry.ts < EXCLUDED.ts"
        )


def forget_latest(db: Connection, device_ids: set[str]) -> None:
    db.execute(sa.delete(latest_telemetry).where(latest_telemetry.c.device_id.in_(sorted(device_ids))))


class SharedTelemetry:
    """The reading side: what the other processes stored since the last read (blocking: run `read`
    in a thread)."""

    def __init__(self, engine: Engine, holder: str) -> None:
        self.engine = engine
        self.holder = holder
        self.cursor = 0.0  # the newest `stored_at` read (0: read everything once, at start)
        self.reads = 0
        self.applied = 0
        self.last_read_ms = 0.0
        self.last_changed = 0  # rows in the last read's window
        self.last_fetched = 0  # of them, payloads fetched (newer than held)

    def read(self, held: Callable[[str], float | None]) -> list[tuple[str, Telemetry, float]]:
        """(device id, telemetry, received_at) for each device whose latest message, stored by
        another process, is newer than `held(device_id)` (the ts this process holds; None: none)."""
        started = time.perf_counter()
        t = latest_telemetry.c
        since = self.cursor - OVERLAP_S if self.cursor else -1.0
        out: list[tuple[str, Telemetry, float]] = []
        try:
            with self.engine.connect() as conn:
                window = conn.execute(
                    sa.select(t.device_id, t.ts, t.stored_at).where(
                        t.stored_at > since, t.holder != self.holder
                    )
                ).all()
                wanted = []
                for device_id, ts, stored_at in window:
                    self.cursor = max(self.cursor, float(stored_at))
                    have = held(device_id)
                    if have is None or have < ts:
                        wanted.append(device_id)
                for start in range(0, len(wanted), FETCH_CHUNK):
                    chunk = wanted[start : start + FETCH_CHUNK]
                    rows = conn.execute(
                        sa.select(t.device_id, t.received_at, t.payload).where(t.device_id.in_(chunk))
                    ).all()
                    for device_id, received_at, payload in rows:
                        try:
                            out.append(
                                (device_id, Telemetry.model_validate_json(payload), float(received_at))
                            )
                        except ValidationError:
                            continue  # only messages that parsed are stored (a newer agent's, for one)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("shared telemetry: database unavailable (%s)", exc)
            return []
        self.reads += 1
        self.last_changed, self.last_fetched = len(window), len(wanted)
        self.last_read_ms = (time.perf_counter() - started) * 1000.0
        return out

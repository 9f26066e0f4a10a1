"""metrics.db stays within its size bound (oldest rows first); it and the console's history migrate an
older schema."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from agent.observability.metrics import COLUMNS, MetricsStore
from agent.protocol.schemas import DeviceTelemetry, Percentiles, Telemetry, TenantTelemetry
from agent.protocol.storage import open_db
from cloud_console.store import ConsoleStore


def row(i: int, ts: float) -> dict:
    return {
        "ts": ts,
        "request_id": f"r{i:07d}-{'x' * 24}",
        "model": "efficientnet-lite0",
        "backend": "onnxruntime",
        "device": "cpu",
        "instance": i % 2,
        "queue_ms": 0.1,
        "preprocess_ms": 1.5,
        "infer_ms": 8.0,
        "total_ms": 9.6,
        "status": "ok",
    }


def test_the_database_stays_within_its_size_bound_dropping_the_oldest_rows(tmp_path):
    path = tmp_path / "metrics.db"
    limit = 2 * 1024 * 1024
    store = MetricsStore(path, retention_s=3600.0, max_bytes=limit)
    store.start()
    store.stop()  # the writer thread is not needed: the test drives flush and prune itself
    db = open_db(path)
    now = time.time()
    sizes = []
    for batch in range(8):
        for i in range(batch * 5000, (batch + 1) * 5000):
            store.record(row(i, now - 1000 + i * 0.01))
        store.flush(db)
        store.prune(db)
        assert store.used_bytes(db) <= limit, f"batch {batch}: {store.used_bytes(db)} bytes in use"
        sizes.append(path.stat().st_size)
    count, oldest, newest = db.execute(
        "SELECT COUNT(*), MIN(request_id), MAX(request_id) FROM inferences"
    ).fetchone()
    assert 0 < count < 40_000, "rows were deleted to stay within the bound"
    assert newest.startswith("r0039999"), "the newest row is kept"
    assert int(oldest[1:8]) == 40_000 - count, "the rows deleted are the oldest"
    db.conn.close()
    # The file holds the bound plus what one check interval adds; then freed pages are reused.
    assert sizes[-1] - sizes[3] < limit * 0.02, f"the file kept growing: {sizes}"


def test_rows_past_the_retention_are_deleted(tmp_path):
    store = MetricsStore(tmp_path / "metrics.db", retention_s=60.0)
    store.start()
    store.stop()
    db = open_db(tmp_path / "metrics.db")
    now = time.time()
    store.record(row(1, now - 120))
    store.record(row(2, now - 10))
    store.flush(db)
    store.prune(db)
    assert [r[0] for r in db.execute("SELECT request_id FROM inferences")] == [row(2, 0)["request_id"]]


def test_a_database_from_an_older_version_gets_the_new_columns(tmp_path: Path):
    path = tmp_path / "metrics.db"
    old = {k: v for k, v in COLUMNS.items() if k not in ("status", "preprocess_ms")}
    with sqlite3.connect(path) as conn:
        cols = ", ".join(
            f"{k} {'TEXT' if v is str else 'REAL' if v is float else 'INTEGER'}" for k, v in old.items()
        )
        conn.execute(f"CREATE TABLE inferences ({cols})")
        conn.execute("INSERT INTO inferences (ts, request_id) VALUES (1.0, 'before')")
    store = MetricsStore(path, retention_s=1e9, flush_interval_s=0.05)
    store.start()
    store.record(row(7, time.time()))
    store.stop()
    with sqlite3.connect(path) as conn:
        got = conn.execute("SELECT request_id, status, preprocess_ms FROM inferences ORDER BY ts").fetchall()
    assert got == [("before", None, None), (row(7, 0)["request_id"], "ok", 1.5)]
    assert store.lost == 0


def test_a_console_database_from_an_older_version_takes_new_telemetry_counters(tmp_path: Path):
    """The console's history gets the columns a newer telemetry schema adds (one writer, one
    migration for both sides): an older database keeps its rows and stores the new counters."""
    path = tmp_path / "console.db"
    with sqlite3.connect(path) as conn:  # the console's tables before `stalls` and the device counters
        conn.execute(
            "CREATE TABLE telemetry (ts REAL, device_id TEXT, model TEXT, backend TEXT, device TEXT,"
            " state TEXT, instances INTEGER, fps REAL, p50_ms REAL, p95_ms REAL, p99_ms REAL,"
            " queue_depth INTEGER, frames_in INTEGER, frames_out INTEGER, errors INTEGER, drops INTEGER,"
            " batch_size_mean REAL)"
        )
        conn.execute(
            "CREATE TABLE host_metrics (ts REAL, device_id TEXT, cpu_percent REAL, rss_mb REAL,"
            " temperature_c REAL, load_1m REAL)"
        )
        conn.execute("INSERT INTO telemetry (ts, device_id, model) VALUES (1.0, 'old', 'm')")
    telemetry = Telemetry(
        device_id="cam1",
        interval_s=5.0,
        tenants=[
            TenantTelemetry(
                model="efficientnet-lite0",
                backend="onnxruntime",
                device="cpu",
                instances=1,
                state="ready",
                frames_in=10,
                frames_out=9,
                stalls=1,
                queue_depth=0,
                latency_ms=Percentiles(p50=8.0, p95=12.5, p99=13.0),
            )
        ],
        device=DeviceTelemetry(cpu_percent=12.0, rss_mb=200.0),
        publishes_refused=4,
    )
    store = ConsoleStore(path, retention_s=1e9, flush_interval_s=0.05)
    store.start()
    store.add_telemetry("cam1", telemetry)
    store.stop()
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT device_id, frames_out, stalls, p95_ms FROM telemetry ORDER BY ts"
        ).fetchall()
        host = conn.execute("SELECT device_id, publishes_refused, duplicates FROM host_metrics").fetchall()
    assert rows == [("old", None, None, None), ("cam1", 9, 1, 12.5)]
    assert host == [("cam1", 4, 0)]
    assert store.lost == 0

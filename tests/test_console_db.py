"""The console's database on both stores (a SQLite file, a real PostgreSQL server from tests/pg.py):
history written and read back, downsampling and the size bound, leases for run-once work, the
shared session secret, each device's latest telemetry shared between processes, and the upgrade in
place of a console.db from the previous version."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa

from agent.protocol.schemas import DeviceTelemetry, Percentiles, Telemetry, TenantTelemetry
from agent.protocol.storage import ensure_table, open_db
from cloud_console import auth
from cloud_console import db as schema
from cloud_console import rollouts as planner
from cloud_console.db import SCHEMA_VERSION, Lease, adopt_files, migrate, open_engine, run_once, shared_secret
from cloud_console.model_store import ModelStore
from cloud_console.pools_policy import Target
from cloud_console.pools_scaler import PoolScaler
from cloud_console.rollout_store import RolloutStore
from cloud_console.rollouts import Change, Gates, Rollout, RolloutSpec
from cloud_console.shared_telemetry import SharedTelemetry
from cloud_console.simulator import FleetSimulator
from cloud_console.store import ConsoleStore
from cloud_console.tokens import TokenStore

pytestmark = pytest.mark.timeout(120)


def _telemetry(device_id: str, ts: float, fps: float, frames_out: int) -> Telemetry:
    return Telemetry(
        device_id=device_id,
        ts=ts,
        interval_s=5.0,
        tenants=[
            TenantTelemetry(
                model="efficientnet-lite0",
                backend="onnxruntime",
                device="cpu",
                instances=1,
                state="ready",
                fps=fps,
                frames_in=frames_out,
                frames_out=frames_out,
                queue_depth=int(fps) % 7,
                latency_ms=Percentiles(p50=8.0, p95=12.5, p99=13.0 + fps),
            )
        ],
        device=DeviceTelemetry(cpu_percent=fps, rss_mb=200.0),
    )


def _store(database: str, **kwargs: Any) -> ConsoleStore:
    """A store with its schema made and no writer thread: the test drives flush and prune."""
    store = ConsoleStore(database, retention_s=1e9, **kwargs)
    store.create_schema(store.connect())
    return store


def _rows(store: ConsoleStore, query: str) -> list[tuple[object, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(query)).all()]


def test_history_is_written_in_batches_and_read_back(database):
    store = _store(database)
    now = time.time()
    for i in range(3):
        store.add_telemetry("cam1", _telemetry("cam1", now - 30 + i, fps=10.0 + i, frames_out=i))
    store.put_device("cam1", True, now - 60, now - 10, '{"old": true}')
    store.put_device("cam1", True, now - 60, now, '{"online": true}')  # coalesced: the latest wins
    store.put_device("gone", False, now, now, "{}")
    store.forget_device("gone")
    store.add_placement("cam1", 3, "ops", "edit", '{"generation": 3}')
    # Listed as soon as it is published, before the writer's next batch (read your writes).
    assert [p["generation"] for p in store.placements_of("cam1")] == [3]
    with store.connect() as conn:
        store.flush(conn)
    assert store.written == 3 + 3 + 1 + 1 + 1 and store.lost == 0
    history = store.telemetry_since("cam1", now - 3600)
    assert [(r["fps"], r["p99_ms"], r["span_s"]) for r in history] == [
        (10.0, 23.0, 0.0),
        (11.0, 24.0, 0.0),
        (12.0, 25.0, 0.0),
    ]
    assert [(d["device_id"], d["status_json"]) for d in store.known_devices()] == [
        ("cam1", '{"online": true}')
    ]
    placed = store.placements_of("cam1")
    assert [(p["generation"], p["user"], p["action"]) for p in placed] == [(3, "ops", "edit")]
    store.add_placement("cam1", 4, "ops", "move", '{"generation": 4}')  # newest first, each once
    assert [p["generation"] for p in store.placements_of("cam1")] == [4, 3]
    # A message the broker sends again (its ack was lost with a killed process) is stored once.
    store.add_telemetry("cam1", _telemetry("cam1", now - 30, fps=10.0, frames_out=0))
    store.add_telemetry("cam1", _telemetry("cam1", now - 5, fps=99.0, frames_out=9))
    with store.connect() as conn:
        store.flush(conn)
    assert store.duplicates == 1
    assert [r["fps"] for r in store.telemetry_since("cam1", now - 3600)] == [10.0, 11.0, 12.0, 99.0]
    # A second process on the same database sees the first's device row with the first first_seen.
    other = _store(database)
    other.put_device("cam1", False, now, now + 1, '{"online": false}')
    with other.connect() as conn:
        other.flush(conn)
    [row] = other.known_devices()
    assert row["first_seen"] == pytest.approx(now - 60) and row["online"] == 0


def test_each_process_reads_the_latest_telemetry_the_others_stored(database):
    a, b = _store(database), _store(database)
    a.share_as, b.share_as = "proc-a", "proc-b"
    now = time.time()

    def add(store: ConsoleStore, device_id: str, ts: float, fps: float) -> None:
        telemetry = _telemetry(device_id, ts, fps, 1)
        store.add_telemetry(device_id, telemetry, telemetry.model_dump_json().encode(), now)
        with store.connect() as conn:
            store.flush(conn)

    def figures(found: list[tuple[str, Telemetry, float]]) -> list[tuple[str, float]]:
        return sorted((device_id, t.tenants[0].fps) for device_id, t, _ in found)

    add(a, "cam1", now - 3, 10.0)
    add(a, "cam1", now - 2, 11.0)
    add(b, "cam2", now - 2, 20.0)
    at_b = SharedTelemetry(b.engine, "proc-b")
    held: dict[str, float] = {}
    found = at_b.read(held.get)
    assert figures(found) == [("cam1", 11.0)]  # A's newest; not B's own
    held["cam1"] = found[0][1].ts
    assert at_b.read(held.get) == []  # nothing newer than held: no payload fetched
    add(a, "cam1", now - 3, 10.0)  # an older message stored again (a redelivery) replaces nothing
    assert at_b.read({}.get) and figures(at_b.read({}.get)) == [("cam1", 11.0)]
    add(b, "cam1", now - 1, 12.0)  # B stores the newest: A reads it, B has it already
    assert figures(SharedTelemetry(a.engine, "proc-a").read({}.get)) == [("cam1", 12.0), ("cam2", 20.0)]
    assert at_b.read({}.get) == []
    b.forget_device("cam2")  # its retained status cleared: gone from the shared rows too
    with b.connect() as conn:
        b.flush(conn)
    assert figures(SharedTelemetry(a.engine, "proc-a").read({}.get)) == [("cam1", 12.0)]


def test_old_telemetry_is_downsampled_and_the_history_bounded(database):
    store = _store(database, downsample_after_s=3600.0, downsample_bucket_s=60.0, max_rows=None)
    now = time.time()
    bucket = (now - 3 * 3600) // 60 * 60  # one whole minute, three hours ago
    for i, (fps, frames) in enumerate([(10.0, 5), (20.0, 7), (30.0, 9)]):
        store.add_telemetry("cam1", _telemetry("cam1", bucket + 5 + 10 * i, fps, frames))
    store.add_telemetry("cam2", _telemetry("cam2", bucket + 30, 50.0, 1))
    for i in range(4):  # recent: kept raw
        store.add_telemetry("cam1", _telemetry("cam1", now - 60 + i, 40.0, 100 + i))
    with store.connect() as conn:
        store.flush(conn)
        store.prune(conn)
    history = store.telemetry_since("cam1", 0)
    old = [r for r in history if r["ts"] < now - 3600]
    assert len(old) == 1, history  # three raw rows became one per device and minute
    assert old[0]["ts"] == pytest.approx(bucket) and old[0]["span_s"] == 60.0
    assert old[0]["fps"] == pytest.approx(20.0) and old[0]["p99_ms"] == pytest.approx(43.0)
    assert _rows(
        store, f"SELECT frames_out FROM telemetry WHERE device_id = 'cam1' AND ts < {now - 3600}"
    ) == [(9,)]  # a counter (since the tenant started) keeps its last value
    assert [r["span_s"] for r in history if r["ts"] >= now - 3600] == [0.0] * 4
    assert len([r for r in store.telemetry_since("cam2", 0)]) == 1
    host = _rows(
        store, f"SELECT cpu_percent, span_s FROM host_metrics WHERE device_id = 'cam1' AND ts < {now - 3600}"
    )
    assert host == [(pytest.approx(20.0), 60.0)]
    assert store.downsampled == 4 + 4  # raw rows replaced: tenants and host
    with store.connect() as conn:
        store.prune(conn)  # again: nothing more to do, the downsampled rows stay as they are
    assert len(store.telemetry_since("cam1", 0)) == 5

    bounded = _store(database, max_rows=3)
    with bounded.connect() as conn:
        bounded.prune(conn)  # another holder's lease: nothing happens
    assert len(_rows(bounded, "SELECT ts FROM telemetry")) == 6
    bounded.maintenance.holder = store.maintenance.holder
    with bounded.connect() as conn:
        bounded.prune(conn)
    kept = sorted(t for (t,) in _rows(bounded, "SELECT ts FROM telemetry"))
    assert len(kept) == 3 and kept[0] >= now - 60  # the newest stay


def test_a_lease_has_one_holder_until_it_expires(database):
    engine = open_engine(database)
    migrate(engine)
    first = Lease(engine, "rollout-step", ttl_s=60.0, holder="a")
    second = Lease(engine, "rollout-step", ttl_s=60.0, holder="b")
    ran: list[str] = []
    assert run_once(first, lambda: ran.append("a"))
    assert not run_once(second, lambda: ran.append("b"))
    assert first.held() and ran == ["a"]
    with engine.begin() as conn:  # the holder died a while ago: its lease ran out
        conn.execute(sa.update(schema.leases).values(expires=time.time() - 1))
    assert second.held() and not first.held()
    # Without asking the database again: the holder stops acting before its lease could pass on.
    assert second.still_held() and not first.still_held()
    second.release()
    assert not second.still_held() and first.held()
    assert Lease(engine, "other-job", holder="b").held()  # one lease per job name


def test_every_process_on_a_database_gets_the_same_session_secret(database):
    engines = [open_engine(database) for _ in range(2)]
    migrate(engines[0])
    secrets_seen = {shared_secret(e) for e in engines}
    assert len(secrets_seen) == 1 and len(next(iter(secrets_seen))) >= 32


def test_processes_starting_together_migrate_once(database):
    engines = [open_engine(database) for _ in range(4)]
    errors: list[BaseException] = []

    def start(engine: sa.engine.Engine) -> None:
        try:
            migrate(engine)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if database.startswith("postgresql"):
        assert errors == []
    with engines[0].connect() as conn:
        assert conn.execute(sa.select(schema.schema_version.c.version)).scalars().all() == [SCHEMA_VERSION]


# The previous version's console.db, as sqlite-utils and the auth modules made it (no schema_version).
PREVIOUS_LAYOUT = """
CREATE TABLE "telemetry" ("ts" REAL, "device_id" TEXT, "model" TEXT, "backend" TEXT, "device" TEXT,
  "state" TEXT, "instances" INTEGER, "fps" REAL, "p50_ms" REAL, "p95_ms" REAL, "p99_ms" REAL,
  "queue_depth" INTEGER, "frames_in" INTEGER, "frames_out" INTEGER, "errors" INTEGER, "drops" INTEGER,
  "stalls" INTEGER, "batch_size_mean" REAL);
CREATE INDEX "idx_telemetry_device_id_ts" ON "telemetry" ("device_id", "ts");
CREATE INDEX "idx_telemetry_ts" ON "telemetry" ("ts");
CREATE TABLE "host_metrics" ("ts" REAL, "device_id" TEXT, "cpu_percent" REAL, "rss_mb" REAL,
  "temperature_c" REAL, "load_1m" REAL, "duplicates" INTEGER, "publishes_refused" INTEGER);
CREATE INDEX "idx_host_metrics_device_id_ts" ON "host_metrics" ("device_id", "ts");
CREATE INDEX "idx_host_metrics_ts" ON "host_metrics" ("ts");
CREATE TABLE "devices" ("device_id" TEXT PRIMARY KEY, "online" INTEGER, "first_seen" REAL,
  "last_seen" REAL, "status_json" TEXT);
CREATE TABLE "placements" ("id" INTEGER PRIMARY KEY, "ts" REAL, "device_id" TEXT, "generation" INTEGER,
  "user" TEXT, "action" TEXT, "document" TEXT);
CREATE INDEX "idx_placements_device_id_ts" ON "placements" ("device_id", "ts");
CREATE TABLE password_upgrades (user TEXT PRIMARY KEY, replaces TEXT NOT NULL, hash TEXT NOT NULL,
  ts REAL NOT NULL);
CREATE TABLE revoked_sessions (sid TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE api_tokens (id TEXT PRIMARY KEY, user TEXT NOT NULL, role TEXT NOT NULL, name TEXT NOT NULL,
  hash TEXT NOT NULL, created REAL NOT NULL, last_used REAL, revoked REAL);
"""


def test_the_previous_sqlite_layout_upgrades_in_place(tmp_path: Path):
    """A console.db written by the previous version (and its model store index files) opens with
    every row kept: history, devices, placements, API tokens, upgraded password hashes, models."""
    path = tmp_path / "console.db"
    now = time.time()
    token = "ect_0123456789abcdef_" + "s" * 43  # a token as the previous version stored it
    from cloud_console.tokens import _digest

    with sqlite3.connect(path) as conn:
        conn.executescript(PREVIOUS_LAYOUT)
        conn.execute(
            "INSERT INTO telemetry (ts, device_id, model, fps, frames_out) VALUES (?, 'cam1', 'm', 12.5, 7)",
            [now],
        )
        for _ in range(2):  # the same message twice: kept once
            conn.execute(
                "INSERT INTO host_metrics (ts, device_id, cpu_percent) VALUES (?, 'cam1', 3.0)", [now]
            )
        conn.execute(
            "INSERT INTO devices VALUES ('cam1', 1, ?, ?, '{\"device_id\": \"cam1\"}')", [now - 9, now]
        )
        conn.execute(
            "INSERT INTO placements (ts, device_id, generation, user, action, document)"
            " VALUES (?, 'cam1', 4, 'ops', 'edit', '{}')",
            [now],
        )
        conn.execute(
            "INSERT INTO password_upgrades VALUES ('ops', ?, 'upgraded-hash', ?)",
            [auth.password_binding("cfg"), now],
        )
        conn.execute("INSERT INTO revoked_sessions VALUES ('old-sid', ?)", [now + 60])
        conn.execute(
            "INSERT INTO api_tokens (id, user, role, name, hash, created) VALUES ('0123456789abcdef', 'ops',"
            " 'admin', 'ci', ?, ?)",
            [_digest("s" * 43), now],
        )
    entry = {
        "name": "det",
        "version": "1.0",
        "task": "detect",
        "files": [],
        "size": 0,
        "uploaded_at": now,
        "by": "ops",
    }
    index = tmp_path / "model-store" / "index" / "det"
    index.mkdir(parents=True)
    (index / "1.0.json").write_text(json.dumps(entry))

    engine = open_engine(path)
    assert migrate(engine) == 0  # the layout from before versions were kept
    assert migrate(engine) == SCHEMA_VERSION  # and nothing runs twice
    store = ConsoleStore(engine, retention_s=1e9)
    [row] = store.telemetry_since("cam1", 0)
    assert (row["fps"], row["span_s"]) == (12.5, 0.0)  # old rows count as raw
    assert [d["device_id"] for d in store.known_devices()] == ["cam1"]
    assert [p["generation"] for p in store.placements_of("cam1")] == [4]
    assert _rows(store, "SELECT device_id, cpu_percent FROM host_metrics") == [("cam1", 3.0)]
    assert auth.PasswordUpgrades(engine).effective("ops", "cfg") == "upgraded-hash"
    identity = TokenStore(engine).authenticate(token)
    assert identity is not None and (identity.user, identity.role) == ("ops", "admin")
    models = ModelStore(tmp_path / "model-store", engine)
    assert [(e["name"], e["version"], e["by"]) for e in models.list()] == [("det", "1.0", "ops")]
    # New telemetry takes the new column; new sessions go to the sessions table.
    store.add_telemetry("cam1", _telemetry("cam1", now + 1, 30.0, 8))
    with store.connect() as conn:
        store.flush(conn)
    assert [r["span_s"] for r in store.telemetry_since("cam1", 0)] == [0.0, 0.0]
    signer = auth.SessionSigner(b"k" * 32, 3600, db=engine)
    cookie, _ = signer.issue("ops")
    assert signer.read(cookie) is not None


# -- rollouts, device tags and pool targets: shared by every process on the database -----------------
M = "efficientnet-lite0"


def _rollout_doc(rollout_id: str, devices: list[str]) -> str:
    spec = RolloutSpec(change=Change(model=M, set={"version": "2.0.0"}), waves=["1", "all"])
    return planner.create(rollout_id, spec, devices, time.time(), "ops").model_dump_json(
        exclude_defaults=True
    )


def _previous_version(database: str, local: Path) -> None:
    """A database as the previous version (schema 3) left it, with its rollouts and tags where it
    kept them: sqlite-utils tables in the console's SQLite file (with PostgreSQL: a SQLite file of
    their own at `storage.db`), and pool targets in pool-targets.json beside that file."""
    engine = open_engine(database)
    migrate(engine)
    with engine.begin() as conn:
        for table in (schema.rollouts, schema.device_tags, schema.pool_targets):
            conn.execute(sa.text(f"DROP TABLE {table.name}"))
        conn.execute(sa.update(schema.schema_version).values(version=3))
    engine.dispose()
    db = open_db(local)  # exactly as the previous SqliteRolloutStore made them
    ensure_table(
        db,
        "rollouts",
        {"id": str, "state": str, "created": float, "updated": float, "document": str},
        [["state"]],
        pk="id",
    )
    ensure_table(db, "device_tags", {"device_id": str, "tags": str, "updated": float}, pk="device_id")
    with db.conn:
        db["rollouts"].insert(
            {
                "id": "r-old",
                "state": "running",
                "created": 1.0,
                "updated": 2.0,
                "document": _rollout_doc("r-old", ["cam1", "cam2"]),
            }
        )
        db["device_tags"].insert({"device_id": "cam1", "tags": '{"ring": "canary"}', "updated": 2.0})
    db.conn.close()
    targets = [{"pool": "driveway", "model": M, "auto": True, "fps": 40.0, "min_members": 2}]
    local.with_name("pool-targets.json").write_text(json.dumps(targets))


def test_an_upgrade_keeps_rollouts_tags_and_pool_targets(database: str, tmp_path: Path):
    local = tmp_path / "console.db"  # storage.db: the database itself with SQLite
    _previous_version(database, local)
    engine = open_engine(database)
    assert migrate(engine) == 3
    imported = adopt_files(engine, local)
    assert local.with_name("pool-targets.json.imported").exists()
    assert not local.with_name("pool-targets.json").exists()
    if database.startswith("postgresql"):
        assert imported == [local.with_name("pool-targets.json"), local]
        assert local.with_name("console.db.imported").exists() and not local.exists()
    store = RolloutStore(engine)
    [row] = store.read()
    rollout = Rollout.model_validate_json(row.document)
    assert (row.id, row.revision, rollout.id, sorted(rollout.devices)) == (
        "r-old",
        1,
        "r-old",
        ["cam1", "cam2"],
    )
    assert store.tags() == {"cam1": {"ring": "canary"}}
    scaler = PoolScaler(cast(Any, None), engine=engine)
    assert scaler.targets == {("driveway", M): Target(fps=40.0, min_members=2)}
    assert scaler.auto == {("driveway", M): True}
    # Imported once: a tag removed since is not brought back by the next start.
    store.set_tags("cam1", {}, time.time())
    migrate(engine)
    assert adopt_files(engine, local) == [] and store.tags() == {}


def test_rollouts_tags_and_targets_written_by_one_process_are_read_by_another(database: str):
    engines = [open_engine(database) for _ in range(2)]
    migrate(engines[0])
    a, b = (RolloutStore(e) for e in engines)
    assert a.insert("r1", "running", 1.0, _rollout_doc("r1", ["cam1"])) == 1
    assert b.revisions() == ({"r1": 1}, None)
    # Both read revision 1; the first write wins, the second is refused (and writes nothing).
    assert b.save("r1", "paused", '{"by": "b"}', revision=1) == 2
    assert a.save("r1", "running", '{"by": "a"}', revision=1) is None
    assert [(r.id, r.revision, r.document) for r in a.read(["r1"])] == [("r1", 2, '{"by": "b"}')]
    assert a.save("r1", "running", '{"by": "a"}', revision=2) == 3
    b.set_tags("cam1", {"ring": "canary", "site": ""}, time.time())
    version = a.revisions()[1]
    assert version is not None and a.tags() == {"cam1": {"ring": "canary", "site": ""}}
    b.set_tags("cam1", {}, time.time())  # every write, a removal too, is a new version to poll
    assert a.revisions()[1] not in (None, version) and a.tags() == {}
    b.set_tags("cam1", {"ring": "canary", "site": ""}, time.time())
    with engines[0].begin() as conn:  # a damaged row is skipped, not fatal
        conn.execute(sa.insert(schema.device_tags).values(device_id="cam2", tags="{no", updated=0.0))
    assert a.tags() == {"cam1": {"ring": "canary", "site": ""}}
    one = PoolScaler(cast(Any, None), engine=engines[0])
    one.set_target("driveway", M, Target(fps=40.0, min_members=2), auto=True)
    other = PoolScaler(cast(Any, None), engine=engines[1])  # another process, or the next start
    assert other.targets == {("driveway", M): Target(fps=40.0, min_members=2)} and other.auto[("driveway", M)]
    one.set_target("driveway", M, Target(fps=60.0), auto=False)
    other.load_targets()
    assert other.targets[("driveway", M)] == Target(fps=60.0) and not other.auto[("driveway", M)]


async def _until(check: Any, what: str, within_s: float = 45.0) -> Any:
    deadline = time.monotonic() + within_s
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return got


def test_one_process_steps_rollouts_and_another_carries_on_when_it_dies(database: str, tmp_path: Path):
    """Two consoles (and their rollout engines) on one database and one broker, four simulated
    devices. A rollout created, approved and tagged through B is stepped by A, the lease holder:
    only A publishes. A dies (its lease runs out): B takes over from the stored record and finishes
    it; every device got its placement once."""
    from agent.devtools.local_broker import LocalBroker
    from cloud_console.config import BrokerSettings, ConsoleConfig, StorageSettings, WebSettings
    from cloud_console.rollout_engine import RolloutEngine
    from cloud_console.service import Console

    def config(name: str, broker: LocalBroker) -> ConsoleConfig:
        storage = (
            StorageSettings(db=tmp_path / f"{name}.db", database=database)
            if database.startswith("postgresql")
            else StorageSettings(db=Path(database))
        )
        return ConsoleConfig(
            broker=BrokerSettings(url=broker.url, client_id=f"console-{name}"),
            storage=storage,
            web=WebSettings(listen=f"127.0.0.1:{18080 + len(name)}"),
        )

    gates = {"soak_s": 0.5, "max_p95_factor": 3.0, "min_throughput_ratio": 0.3}
    spec = RolloutSpec(
        change=Change(model=M, set={"version": "1.0.0"}),
        waves=["1", "1", "all"],
        promotion="manual",
        gates=Gates(**gates),
    )

    async def scenario(broker: LocalBroker, sim: FleetSimulator) -> None:
        a, b = Console(config("a", broker)), Console(config("bb", broker))
        ea, eb = RolloutEngine(a, tick_s=0.1), RolloutEngine(b, tick_s=0.1)
        await a.start()
        await b.start()
        try:
            await ea.start()
            await _until(lambda: ea.holding, "A to take the lease")
            await eb.start()
            ids = sorted(sim.device_map)
            for console in (a, b):
                await _until(
                    lambda c=console: all(
                        d in c.fleet.devices and c.fleet.devices[d].telemetry is not None for d in ids
                    ),
                    "every device with telemetry",
                )
            await eb.set_tags(ids[0], {"ring": "canary"})
            assert await _until(lambda: ea.select("ring=canary"), "A to see B's tag") == [ids[0]]

            rollout = await eb.create(spec, "ops")  # through B: stepped by A

            def at(engine: RolloutEngine) -> tuple[str, int] | None:
                found = engine.rollouts.get(rollout.id)
                return None if found is None else (found.state, found.current_wave)

            await _until(lambda: at(ea) == ("waiting_approval", 0), "wave 1 by A", 60)
            await _until(lambda: at(eb) == ("waiting_approval", 0), "B to read A's progress")
            await eb.command(rollout.id, "approve", "ops")
            await _until(lambda: at(ea) == ("waiting_approval", 1), "wave 2 by A, approved through B", 60)
            assert (ea.placements["forward"], eb.placements["forward"], eb.holding) == (2, 0, False)

            # A dies: it steps no more and its lease runs out.
            assert ea._task is not None
            ea._task.cancel()
            with a.engine.begin() as conn:
                conn.execute(
                    sa.update(schema.leases)
                    .where(schema.leases.c.name == "rollouts")
                    .values(expires=time.time() - 1)
                )
            await _until(lambda: eb.holding, "B to take the lease over")
            await eb.command(rollout.id, "approve", "ops")
            done = await _until(
                lambda: eb.get(rollout.id).state == "completed" and eb.get(rollout.id), "B to finish it", 60
            )
            assert done.counts() == {"succeeded": 4}
            assert (ea.placements["forward"], eb.placements["forward"]) == (2, 2)
        finally:
            await eb.stop()
            await b.stop()
            await a.stop()
        engine = open_engine(database)  # each process's writer flushed what it published at stop
        with engine.connect() as conn:
            placed = conn.scalars(
                sa.select(schema.placements.c.device_id).where(
                    schema.placements.c.user == f"rollout {rollout.id}"
                )
            ).all()
        engine.dispose()
        assert sorted(placed) == ids  # each device placed once, by A or by B

    with LocalBroker() as broker:
        sim = FleetSimulator(broker.host, broker.port, 4, interval_s=0.3, id_prefix="lease").start()
        try:
            asyncio.run(scenario(broker, sim))
        finally:
            sim.stop()


def test_one_process_scales_the_pools_with_targets_set_through_another(database: str, tmp_path: Path):
    """Two pool scalers on one database: a target set through B is scaled by A, the holder of the
    lease `pools`; B decides nothing until A's lease runs out, then carries on."""
    from cloud_console.config import ConsoleConfig, StorageSettings
    from cloud_console.service import Console

    storage = (
        StorageSettings(db=tmp_path / "local.db", database=database)
        if database.startswith("postgresql")
        else StorageSettings(db=Path(database))
    )
    a, b = (PoolScaler(Console(ConsoleConfig(storage=storage))) for _ in range(2))

    async def scenario() -> None:
        await a.turn()
        b.set_target("driveway", M, Target(fps=40.0, up_after_s=0.0), auto=True)
        await b.turn()
        await a.turn()
        assert (a.holding, b.holding) == (True, False)
        assert a.decisions[("driveway", M)].reason.startswith("no device to add")  # nobody online
        assert b.decisions == {}
        with a.engine.begin() as conn:  # A died: its lease ran out
            conn.execute(
                sa.update(schema.leases)
                .where(schema.leases.c.name == "pools")
                .values(expires=time.time() - 1)
            )
        await b.turn()
        assert b.holding and b.decisions[("driveway", M)].reason.startswith("no device to add")
        await a.turn()  # back, but the lease is B's now
        assert not a.holding and a.decisions == {}

    try:
        asyncio.run(scenario())
    finally:
        for scaler in (a, b):
            scaler.console.engine.dispose()

"""The console's database: one schema (SQLAlchemy Core) on SQLite or PostgreSQL, migrated at start.

SQLite (a file beside the console) is the embedded default: no setup, one process. PostgreSQL
(`[storage] database = "postgresql://..."`) lets several console processes share one fleet history,
one set of sessions and tokens, and one model store index (docs/operations.md#postgresql).

Migrations are a short numbered list of functions in this module rather than Alembic: the tables
are few, the same code must upgrade a SQLite file made by sqlite-utils before versions were kept
(which Alembic cannot tell from an empty database without a stamp), and the telemetry columns
follow the wire schema (a counter added to agent.protocol gets its column at the next start). So:
`create_all` makes what is missing, missing columns are added, then each step above the stored
`schema_version` runs once, all in one transaction (PostgreSQL: under an advisory lock, so two
processes starting together migrate once).

`Lease` / `run_once` make periodic work (retention, downsampling, rollout steps) happen in one
process of several: a row per job name with its holder and expiry, taken with one conditional
UPDATE or INSERT, the same on both databases.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite as sq
from sqlalchemy.engine import Connection, Engine

from agent.protocol.schemas import DeviceCounters, TenantCounters

log = logging.getLogger(__name__)


class DatabaseError(Exception):
    """The console's database cannot be opened or migrated; the message says what to fix."""


metadata = sa.MetaData()
Int: sa.types.TypeEngine[int] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # counters > 2^31


def _col(name: str, kind: type) -> sa.Column[Any]:
    types: dict[type, sa.types.TypeEngine[Any]] = {float: sa.Float(), str: sa.Text(), int: Int}
    return sa.Column(name, types[kind])


# Fleet history. Names and columns are those of the earlier sqlite-utils layout (same index names
# too), so an existing console.db upgrades in place. `span_s` is 0 for a raw row and the bucket width
# for a downsampled one (rows from before downsampling read NULL: raw).
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
    "span_s": float,
}
HOST_COLUMNS: dict[str, type] = {
    "ts": float,
    "device_id": str,
    "cpu_percent": float,
    "rss_mb": float,
    "temperature_c": float,
    "load_1m": float,
    **dict.fromkeys(DeviceCounters.model_fields, int),
    "span_s": float,
}
telemetry = sa.Table(
    "telemetry",
    metadata,
    *(_col(n, k) for n, k in TELEMETRY_COLUMNS.items()),
    sa.Index("idx_telemetry_device_id_ts", "device_id", "ts"),
    sa.Index("idx_telemetry_ts", "ts"),
)
host_metrics = sa.Table(
    "host_metrics",
    metadata,
    *(_col(n, k) for n, k in HOST_COLUMNS.items()),
    # One host row per telemetry message: a message the broker sends again is stored once.
    sa.Index("idx_host_metrics_device_id_ts", "device_id", "ts", unique=True),
    sa.Index("idx_host_metrics_ts", "ts"),
)
devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.Text(), primary_key=True),
    sa.Column("online", sa.Integer()),
    sa.Column("first_seen", sa.Float()),
    sa.Column("last_seen", sa.Float()),
    sa.Column("status_json", sa.Text()),
)
placements = sa.Table(
    "placements",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float()),
    sa.Column("device_id", sa.Text()),
    sa.Column("generation", Int),
    sa.Column("user", sa.Text()),
    sa.Column("action", sa.Text()),
    sa.Column("document", sa.Text()),
    sa.Index("idx_placements_device_id_ts", "device_id", "ts"),
)

# Logins and credentials.
password_upgrades = sa.Table(
    "password_upgrades",
    metadata,
    sa.Column("user", sa.Text(), primary_key=True),
    sa.Column("replaces", sa.Text(), nullable=False),
    sa.Column("hash", sa.Text(), nullable=False),
    sa.Column("ts", sa.Float(), nullable=False),
)
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("sid", sa.Text(), primary_key=True),
    sa.Column("user", sa.Text(), nullable=False),
    sa.Column("created", sa.Float(), nullable=False),
    sa.Column("expires", sa.Float(), nullable=False),
    sa.Column("revoked", sa.Float()),
    sa.Index("idx_sessions_expires", "expires"),
)
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Text(), primary_key=True),
    sa.Column("user", sa.Text(), nullable=False),
    sa.Column("role", sa.Text(), nullable=False),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("hash", sa.Text(), nullable=False),
    sa.Column("created", sa.Float(), nullable=False),
    sa.Column("last_used", sa.Float()),
    sa.Column("revoked", sa.Float()),
)

# The model store's records (the files themselves stay in the model-store folder, by sha256).
model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("name", sa.Text(), primary_key=True),
    sa.Column("version", sa.Text(), primary_key=True),
    sa.Column("entry", sa.Text(), nullable=False),  # the JSON entry: task, files, size, who, when
    sa.Column("uploaded_at", sa.Float(), nullable=False),
)

# Console-wide values (the generated session secret) and the leases of run-once jobs.
settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.Text(), primary_key=True),
    sa.Column("value", sa.Text(), nullable=False),
)
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.Text(), primary_key=True),
    sa.Column("holder", sa.Text(), nullable=False),
    sa.Column("expires", sa.Float(), nullable=False),
)
# Console processes of a shared group and the MQTT client id of each one's persistent session: a
# process whose heartbeat stopped (or that stopped with messages left) has its session drained by
# another (cloud_console/service.py).
console_processes = sa.Table(
    "console_processes",
    metadata,
    sa.Column("client_id", sa.Text(), primary_key=True),
    sa.Column("holder", sa.Text(), nullable=False),
    sa.Column("seen", sa.Float(), nullable=False),
    sa.Column("left_at", sa.Float()),
)
schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer(), nullable=False))

# Staged rollouts (cloud_console/rollout_store.py): one row per rollout, its record as JSON, written
# whole. `revision` goes up by one on every write, and a write names the revision it read (compare
# and swap): a command taken by one process never silently overwrites the stepping process's record,
# nor the other way round. Names and columns are those of the earlier sqlite-utils tables.
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.Text(), primary_key=True),
    sa.Column("state", sa.Text()),
    sa.Column("created", sa.Float()),
    sa.Column("updated", sa.Float()),
    sa.Column("document", sa.Text()),
    sa.Column("revision", Int),
    sa.Index("idx_rollouts_state", "state"),
)
device_tags = sa.Table(
    "device_tags",
    metadata,
    sa.Column("device_id", sa.Text(), primary_key=True),
    sa.Column("tags", sa.Text()),  # JSON object: key -> value ("" hides a tag the device reports)
    sa.Column("updated", sa.Float()),
)
# Pool scaling targets (cloud_console/pools_scaler.py): the fields of pools_policy.Target as JSON.
pool_targets = sa.Table(
    "pool_targets",
    metadata,
    sa.Column("pool", sa.Text(), primary_key=True),
    sa.Column("model", sa.Text(), primary_key=True),
    sa.Column("auto", sa.Integer(), nullable=False),
    sa.Column("target", sa.Text(), nullable=False),
    sa.Column("updated", sa.Float(), nullable=False),
)
POOL_TARGETS_FILE = "pool-targets.json"  # where the previous version kept them, beside storage.db
# A `settings` row changed with every write of device tags: processes poll it, not the whole table.
TAGS_VERSION = "device_tags_version"


def tags_changed(conn: Connection) -> None:
    """Note that device tags changed (in the transaction that changed them)."""
    upsert(conn, settings, [{"key": TAGS_VERSION, "value": secrets.token_hex(8)}], ["key"])


def _step_sessions_in_db(conn: Connection) -> None:
    """v1: sessions moved into the database. The per-logout table of earlier versions is dropped:
    cookies issued before have no session row, so each user logs in once after the upgrade."""
    conn.execute(sa.text("DROP TABLE IF EXISTS revoked_sessions"))


def _step_raw_telemetry(conn: Connection) -> None:
    """v2: rows written before downsampling existed are raw rows."""
    conn.execute(sa.update(telemetry).where(telemetry.c.span_s.is_(None)).values(span_s=0.0))
    conn.execute(sa.update(host_metrics).where(host_metrics.c.span_s.is_(None)).values(span_s=0.0))


def _step_one_row_per_message(conn: Connection) -> None:
    """v3: host rows unique per (device, ts), so a telemetry message delivered twice is stored once."""
    name = "idx_host_metrics_device_id_ts"
    found = {i["name"]: i for i in sa.inspect(conn).get_indexes("host_metrics")}
    if name in found and found[name]["unique"]:
        return
    if name in found:
        conn.execute(sa.text(f"DROP INDEX {name}"))
    row_id = "ctid" if is_postgres(conn) else "rowid"
    conn.execute(
        sa.text(
            f"DELETE FROM host_metrics WHERE {row_id} NOT IN"  # noqa: S608 - constants only
            f" (SELECT min({row_id}) FROM host_metrics GROUP BY device_id, ts)"
        )
    )
    conn.execute(sa.text(f"CREATE UNIQUE INDEX {name} ON host_metrics (device_id, ts)"))


def _step_shared_rollouts(conn: Connection) -> None:
    """v4: rollouts and device tags in the shared schema. The sqlite-utils tables of a console.db
    have the same names and columns and are kept as they are; their rows get a first revision."""
    conn.execute(sa.update(rollouts).where(rollouts.c.revision.is_(None)).values(revision=1))
    if "idx_rollouts_state" not in {i["name"] for i in sa.inspect(conn).get_indexes("rollouts")}:
        conn.execute(sa.text("CREATE INDEX idx_rollouts_state ON rollouts (state)"))


MIGRATIONS: list[Callable[[Connection], None]] = [
    _step_sessions_in_db,
    _step_raw_telemetry,
    _step_one_row_per_message,
    _step_shared_rollouts,
]
SCHEMA_VERSION = len(MIGRATIONS)
MIGRATION_LOCK = 0x6564_6765  # "edge": the advisory lock key of migrations on PostgreSQL


def database_url(value: str | Path) -> str:
    """A SQLAlchemy URL from what the config says: a path (SQLite), `sqlite:///...` or
    `postgresql://...` (psycopg 3 is the driver)."""
    text = str(value)
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if text.startswith(("postgresql+psycopg://", "sqlite://")):
        return text
    if "://" in text:
        raise DatabaseError(f"database {text!r}: use a file path, sqlite:///PATH or postgresql://...")
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparsable database URL>"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (API threads) read while the writer writes
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def open_engine(value: str | Path) -> Engine:
    """An engine for the console's database (nothing is connected yet)."""
    url = database_url(value)
    try:
        if url.startswith("sqlite"):
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"timeout": 10.0, "check_same_thread": False})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            # A few connections per process: the writer thread, API reads, the lease.
            engine = sa.create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise DatabaseError(f"database {redacted(url)}: {exc}") from exc
    return engine


def is_postgres(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "postgresql"


def _add_missing_columns(conn: Connection) -> None:
    """Columns an older version's tables lack (rows written before read NULL there)."""
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                log.info("database: adding column %s to %s", column.name, table.name)
                kind = column.type.compile(dialect=conn.dialect)
                name = conn.dialect.identifier_preparer.quote(column.name)
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))


def migrate(engine: Engine) -> int:
    """Bring the schema to SCHEMA_VERSION (create, add columns, run the steps not yet run). Returns
    the version the database was at (0: new, or the layout from before versions were kept)."""
    try:
        with engine.begin() as conn:
            if is_postgres(conn):
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            metadata.create_all(conn, checkfirst=True)
            _add_missing_columns(conn)
            found = conn.scalar(sa.select(sa.func.max(schema_version.c.version))) or 0
            if found > SCHEMA_VERSION:
                raise DatabaseError(
                    f"the database is at schema version {found}, newer than this console's"
                    f" {SCHEMA_VERSION}: upgrade the console"
                )
            for number, step in enumerate(MIGRATIONS, start=1):
                if number > found:
                    log.info("database: migration %d (%s)", number, (step.__doc__ or "").split(":")[0])
                    step(conn)
            if found != SCHEMA_VERSION:
                conn.execute(sa.delete(schema_version))
                conn.execute(sa.insert(schema_version).values(version=SCHEMA_VERSION))
            return int(found)
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(f"database {redacted(str(engine.url))}: {exc}") from exc


def adopt_files(engine: Engine, db_file: Path) -> list[Path]:
    """Import once what the previous version kept in files beside `storage.db`: `pool-targets.json`,
    and (with PostgreSQL, where that SQLite file held only them) the rollouts and device tags of
    the file itself. Each imported file is renamed `<name>.imported`, so it is not read again and
    nothing is lost; rows already in the database win. Returns the files imported."""
    done: list[Path] = []
    targets_file = db_file.with_name(POOL_TARGETS_FILE)
    if targets_file.is_file():
        try:
            rows = _pool_target_rows(json.loads(targets_file.read_text()), targets_file.stat().st_mtime)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error("pool targets in %s not imported (fix or remove the file): %s", targets_file, exc)
        else:
            _import(engine, [(pool_targets, ["pool", "model"], rows)])
            done.append(targets_file)
    if is_postgres(engine) and db_file.is_file():
        try:
            found = _sqlite_rows(db_file)
        except sqlite3.Error as exc:
            log.error("rollouts and tags in %s not imported: %s", db_file, exc)
        else:
            if found is not None:
                ours = [{**r, "revision": 1} for r in found[0]]
                _import(engine, [(rollouts, ["id"], ours), (device_tags, ["device_id"], found[1])])
                with engine.begin() as conn:
                    tags_changed(conn)
                done.append(db_file)
    for path in done:
        try:
            os.replace(path, path.with_name(path.name + ".imported"))
        except OSError as exc:  # imported again at the next start: existing rows are kept
            log.warning("%s imported but not renamed: %s", path, exc)
        log.info("database: imported %s (kept as %s.imported)", path, path.name)
    return done


def _import(engine: Engine, tables: list[tuple[sa.Table, list[str], list[dict[str, Any]]]]) -> None:
    try:
        with engine.begin() as conn:
            for table, keys, rows in tables:
                upsert(conn, table, rows, keys, update=[])
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(f"database {redacted(str(engine.url))}: {exc}") from exc


def _pool_target_rows(data: Any, updated: float) -> list[dict[str, Any]]:
    rows = []
    for row in data:
        fields = {k: v for k, v in row.items() if k not in ("pool", "model", "auto")}
        rows.append(
            {
                "pool": str(row["pool"]),
                "model": str(row["model"]),
                "auto": int(bool(row.get("auto", False))),
                "target": json.dumps(fields, sort_keys=True),
                "updated": updated,
            }
        )
    return rows


def _sqlite_rows(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """The rollouts and device tags of a SQLite file of the previous version; None: it has none."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"rollouts", "device_tags"} & names:
            return None
        found: list[list[dict[str, Any]]] = []
        for table, columns in (("rollouts", "id, state, created, updated, document"), ("device_tags", "*")):
            query = f"SELECT {columns} FROM {table}"  # noqa: S608 - constants only
            found.append([dict(r) for r in conn.execute(query)] if table in names else [])
        return found[0], found[1]
    finally:
        conn.close()


def upsert(
    conn: Connection,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    keys: Iterable[str],
    update: Iterable[str] | None = None,
) -> int:
    """INSERT ... ON CONFLICT (keys) DO UPDATE the `update` columns (all but the keys by default;
    none: DO NOTHING). Returns the rows inserted or updated."""
    if not rows:
        return 0
    keys = list(keys)
    stmt = (pg.insert if is_postgres(conn) else sq.insert)(table)
    columns = [c for c in (update if update is not None else rows[0]) if c not in keys]
    if columns:
        done = stmt.on_conflict_do_update(index_elements=keys, set_={c: stmt.excluded[c] for c in columns})
    else:
        done = stmt.on_conflict_do_nothing(index_elements=keys)
    if len(rows) == 1:
        # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT statements here.
        key = table.c[keys[0]]
        return len(conn.execute(done.values(rows[0]).returning(key)).all())
    conn.execute(done, list(rows))
    return len(rows)


def shared_secret(engine: Engine, key: str = "session_secret") -> bytes:
    """A random secret kept in the database: every process on it (and the next start) reads the same
    one, so a session cookie made by one process is valid on the others."""
    with engine.begin() as conn:
        upsert(conn, settings, [{"key": key, "value": secrets.token_urlsafe(32)}], ["key"], update=[])
        return str(conn.scalar(sa.select(settings.c.value).where(settings.c.key == key))).encode()


def process_name() -> str:
    """Who holds a lease: host, pid and a random tag (two consoles in one process are two holders)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Lease:
    """One named job that one process of several runs at a time (`held()` takes or renews it).

    The holder renews before `ttl_s` passes; a process that dies lets it expire and another takes it
    over. Used by retention and downsampling, rollout steps and pool scaling.

    `still_held()` answers without the database, for a side effect (a publish) made a while after
    `held()`: true until two thirds of the TTL after the last successful `held()` started, so the
    holder stops before the lease can expire and pass to another process."""

    def __init__(self, engine: Engine, name: str, ttl_s: float = 30.0, holder: str | None = None) -> None:
        self.engine = engine
        self.name = name
        self.ttl_s = ttl_s
        self.holder = holder or process_name()
        self._until = 0.0  # time.monotonic() until which still_held() is true

    def held(self) -> bool:
        """Take the lease if free or expired, renew it if ours. False when another process holds it
        (or the database cannot be reached: then nobody should act)."""
        started = time.monotonic()
        now = time.time()
        try:
            with self.engine.begin() as conn:
                taken = conn.execute(
                    sa.update(leases)
                    .where(leases.c.name == self.name)
                    .where(sa.or_(leases.c.holder == self.holder, leases.c.expires < now))
                    .values(holder=self.holder, expires=now + self.ttl_s)
                ).rowcount
                if not taken:
                    row = {"name": self.name, "holder": self.holder, "expires": now + self.ttl_s}
                    taken = upsert(conn, leases, [row], ["name"], update=[])
        except sa.exc.SQLAlchemyError as exc:
            log.warning("lease %s: database unavailable (%s)", self.name, exc)
            taken = 0
        self._until = started + self.ttl_s * 2 / 3 if taken else 0.0
        return bool(taken)

    def still_held(self) -> bool:
        return time.monotonic() < self._until

    def release(self) -> None:
        self._until = 0.0
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.delete(leases).where(leases.c.name == self.name, leases.c.holder == self.holder)
                )
        except sa.exc.SQLAlchemyError as exc:
            log.warning("lease %s: not released (%s); it expires by itself", self.name, exc)


def run_once(lease: Lease, job: Callable[[], Any]) -> bool:
    """Run `job` when this process holds the lease; True when it ran."""
    if not lease.held():
        return False
    job()
    return True

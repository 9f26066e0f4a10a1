"""The profiler behind auto-placement: how fast a model runs on one backend/device, measured here.

Profiles are short warm benchmarks (the tenant's instance count, batch 1, pre-made
tensors), cached in SQLite keyed by model sha256, backend, device and instances, so a placement is
profiled once per model version and machine. Tenants with `auto_tune` also get a latency table
(`measure_table`): the time of one batch per batch size and instances x threads configuration,
cached in its own table (`batch_profiles`), which older caches simply gain.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.placement.tuning import BATCH_SIZES, Config
from agent.service.model_repo import Model
from backends import isolation, registry
from backends.base import BackendError

log = logging.getLogger(__name__)

Candidate = tuple[str, str]  # (backend, device)


class Profiler:
    def __init__(self, db_path: Path, seconds: float = 1.0) -> None:
        self.db_path = db_path
        self.seconds = seconds
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS profiles (sha256 TEXT, backend TEXT, device TEXT, instances INTEGER, "
            "fps REAL, measured_at REAL, PRIMARY KEY (sha256, backend, device, instances))"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS joint_profiles (key TEXT PRIMARY KEY, fps TEXT, measured_at REAL)"
        )
        # Added with auto_tune: a cache from before has no such table and gains it here (nothing
        # else changes, so an older agent reading the same file is unaffected).
        conn.execute(
            "CREATE TABLE IF NOT EXISTS batch_profiles (sha256 TEXT, backend TEXT, device TEXT, "
            "instances INTEGER, threads INTEGER, batch INTEGER, ms REAL, measured_at REAL, "
            "PRIMARY KEY (sha256, backend, device, instances, threads, batch))"
        )
        return conn

    def cached(self, model: Model, backend: str, device: str, instances: int) -> float | None:
        sha = model.artifacts.sha256.get("onnx", "") or next(iter(model.artifacts.sha256.values()), "")
        with self._lock, self._db() as conn:
            row = conn.execute(
                "SELECT fps FROM profiles WHERE sha256=? AND backend=? AND device=? AND instances=?",
                (sha, backend, device, instances),
            ).fetchone()
        return float(row[0]) if row else None

    def measure(self, model: Model, backend_name: str, device: str, instances: int) -> float:
        """img/s of `instances` parallel sessions at batch 1 (cached). 0.0 when it cannot run."""
        hit = self.cached(model, backend_name, device, instances)
        if hit is not None:
            return hit
        fps = self._run(model, backend_name, device, instances)
        sha = model.artifacts.sha256.get("onnx", "") or next(iter(model.artifacts.sha256.values()), "")
        with self._lock, self._db() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?, ?, ?)",
                (sha, backend_name, device, instances, fps, time.time()),
            )
        log.info("profiled %s on %s:%s x%d: %.1f img/s", model.name, backend_name, device, instances, fps)
        return fps

    def _run(self, model: Model, backend_name: str, device: str, instances: int) -> float:
        return self._run_together([(model, backend_name, device, instances)])[0]

    def measure_together(self, tenants: list[tuple[Model, str, str, int]]) -> list[float]:
        """img/s of each tenant while all of them run at once (cached): what sharing really costs."""
        key = json.dumps(sorted([self._sha(m), b, d, n] for m, b, d, n in tenants))
        with self._lock, self._db() as conn:
            row = conn.execute("SELECT fps FROM joint_profiles WHERE key=?", (key,)).fetchone()
        if row:
            by_key = json.loads(row[0])
            return [by_key[json.dumps([self._sha(m), b, d, n])] for m, b, d, n in tenants]
        figures = self._run_together(tenants)
        by_key = {
            json.dumps([self._sha(m), b, d, n]): f for (m, b, d, n), f in zip(tenants, figures, strict=True)
        }
        with self._lock, self._db() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO joint_profiles VALUES (?, ?, ?)",
                (key, json.dumps(by_key), time.time()),
            )
        return figures

    def measure_table(
        self, model: Model, backend_name: str, device: str, shapes: list[tuple[int, int]]
    ) -> dict[Config, float]:
        """ms per batch for each (instances, threads) of `shapes` and each batch size the model
        takes (cached). A size the model refuses (a static batch-1 graph) ends that row; it is
        cached as 0 and left out of the table."""
        sha = self._sha(model)
        table: dict[Config, float] = {}
        for instances, threads in shapes:
            with self._lock, self._db() as conn:
                rows = conn.execute(
                    "SELECT batch, ms FROM batch_profiles WHERE sha256=? AND backend=? AND device=? "
                    "AND instances=? AND threads=?",
                    (sha, backend_name, device, instances, threads),
                ).fetchall()
            known = {int(b): float(ms) for b, ms in rows}
            if not all(b in known for b in BATCH_SIZES) and not any(ms <= 0 for ms in known.values()):
                known = self._run_table(model, backend_name, device, instances, threads)
                with self._lock, self._db() as conn:
                    conn.executemany(
                        "INSERT OR REPLACE INTO batch_profiles VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (sha, backend_name, device, instances, threads, b, ms, time.time())
                            for b, ms in known.items()
                        ],
                    )
                log.info(
                    "profiled %s on %s:%s x%d t%d: %s",
                    model.name,
                    backend_name,
                    device,
                    instances,
                    threads,
                    {b: round(ms, 1) for b, ms in known.items()},
                )
            for b, ms in known.items():
                if ms > 0:
                    table[Config(instances, threads, b)] = ms
        return table

    def _run_table(
        self, model: Model, backend_name: str, device: str, instances: int, threads: int
    ) -> dict[int, float]:
        """Load `instances` sessions of `threads` threads; for each batch size run them all at once
        for a share of `seconds`: the mean time of one batch on one instance, 0.0 where refused."""
        backend = registry.get(backend_name)
        h, w = model.input.size
        options = {"threads": threads, "instances": instances, "max_batch": max(BATCH_SIZES)}
        sessions: list[Any] = []
        out: dict[int, float] = {}
        try:
            for _ in range(instances):
                sessions.append(isolation.load(backend, model.artifacts, device, options))
            for size in BATCH_SIZES:
                shape = (size, 3, h, w) if model.input.layout == "NCHW" else (size, h, w, 3)
                x = np.zeros(shape, np.dtype(model.input.dtype))
                try:
                    for session in sessions:
                        session.infer(x)  # warm-up: the first run at a size compiles or re-plans
                except BackendError:
                    out[size] = 0.0  # the graph takes no batch of this size: larger ones neither
                    break
                out[size] = self._time_batches(sessions, x, self.seconds / len(BATCH_SIZES))
        except BackendError as exc:
            log.warning("cannot profile %s on %s:%s: %s", model.name, backend_name, device, exc)
            out.setdefault(1, 0.0)
        finally:
            for session in sessions:
                session.close()
        return out

    @staticmethod
    def _time_batches(sessions: list[Any], x: np.ndarray, seconds: float) -> float:
        """Run every session on `x` at once for `seconds`: ms per batch per session."""
        counts = [0] * len(sessions)
        stop = time.perf_counter() + seconds
        failed: list[str] = []

        def loop(i: int) -> None:
            try:
                while time.perf_counter() < stop or counts[i] == 0:
                    sessions[i].infer(x)
                    counts[i] += 1
            except BackendError as exc:
                failed.append(str(exc))

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(sessions))]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        if failed or not all(counts):
            return 0.0
        return 1000.0 * elapsed * len(sessions) / sum(counts)

    @staticmethod
    def _sha(model: Model) -> str:
        return model.artifacts.sha256.get("onnx", "") or next(iter(model.artifacts.sha256.values()), "")

    def _run_together(self, tenants: list[tuple[Model, str, str, int]]) -> list[float]:
        """Load every tenant's instances, run them all concurrently for `seconds`; img/s per tenant."""
        loaded: list[tuple[int, Any, np.ndarray]] = []  # (tenant index, session, input)
        try:
            for index, (model, backend_name, device, instances) in enumerate(tenants):
                backend = registry.get(backend_name)
                h, w = model.input.size
                shape = (1, 3, h, w) if model.input.layout == "NCHW" else (1, h, w, 3)
                x = np.zeros(shape, np.dtype(model.input.dtype))
                for _ in range(instances):
                    session = isolation.load(
                        backend, model.artifacts, device, {"threads": 1, "instances": instances}
                    )
                    session.infer(x)  # warm-up
                    loaded.append((index, session, x))
        except BackendError as exc:
            log.warning("cannot profile %s: %s", [(m.name, b, d) for m, b, d, _ in tenants], exc)
            for _, session, _ in loaded:
                session.close()
            return [0.0] * len(tenants)
        counts = [0] * len(loaded)
        stop = time.perf_counter() + self.seconds
        failed: list[str] = []

        def loop(i: int) -> None:
            _, session, x = loaded[i]
            try:
                while time.perf_counter() < stop:
                    session.infer(x)
                    counts[i] += 1
            except BackendError as exc:
                failed.append(str(exc))

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(loaded))]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        for _, session, _ in loaded:
            session.close()
        if failed:
            log.warning("profiling failed: %s", failed[0])
            return [0.0] * len(tenants)
        per_tenant = [0.0] * len(tenants)
        for (index, _, _), count in zip(loaded, counts, strict=True):
            per_tenant[index] += count / elapsed
        return per_tenant

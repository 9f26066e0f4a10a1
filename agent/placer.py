"""Auto-placement: profile a model on every available backend/device, then place tenants.

The paper's second technique: put each model where it runs best and spread competing models across
accelerators. Profiles are short warm benchmarks (the tenant's instance count, batch 1, pre-made
tensors), cached in SQLite keyed by model sha256, backend, device and instances, so a placement is
profiled once per model version and machine.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.model_repo import Model
from backends import registry
from backends.base import BackendError

log = logging.getLogger(__name__)

Candidate = tuple[str, str]  # (backend, device)


def resource_of(backend: str, device: str) -> str:
    """The physical resource a backend/device runs on: backends on the host CPU share it."""
    d = device.lower()
    if d in ("cpu", "auto") or d.startswith("cpu"):
        return "cpu"
    if d.startswith(("cuda", "tensorrt")):
        return "cuda:" + (d.split(":", 1)[1] if ":" in d else "0")
    return f"{backend}:{d}"


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
                    session = backend.load(model.artifacts, device, {"threads": 1, "instances": instances})
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


def candidates_for(backend: str, device: str) -> list[Candidate]:
    """Backend/device pairs an auto tenant may use: every available one, or one backend's devices."""
    out: list[Candidate] = []
    for name, (ok, devices, _reason) in registry.capabilities().items():
        if not ok or backend not in ("auto", name):
            continue
        for d in devices:
            if name == "openvino" and d.upper() == "AUTO":
                continue  # OpenVINO's own AUTO plugin re-picks a device we profile anyway
            if device.lower() != "auto" and d.lower() != device.lower():
                continue
            out.append((name, d))
    return out


def choose(
    tenants: Mapping[str, Mapping[Candidate, float]], fixed: Mapping[str, Candidate] | None = None
) -> dict[str, Candidate]:
    """Assign each auto tenant a candidate to maximise estimated total throughput.

    Tenants sharing a physical resource split its time evenly, so two models on the same CPU each
    get half of their solo rate; on different accelerators each keeps its own. `fixed` tenants
    (explicit placements) occupy their resource too. Exhaustive for small fleets, greedy beyond.
    """
    fixed = dict(fixed or {})
    names = sorted(tenants)

    def score(assignment: Mapping[str, Candidate]) -> float:
        load: dict[str, int] = {}
        for cand in list(assignment.values()) + list(fixed.values()):
            res = resource_of(*cand)
            load[res] = load.get(res, 0) + 1
        return sum(tenants[n][c] / load[resource_of(*c)] for n, c in assignment.items())

    options = [sorted(tenants[n], key=lambda c: -tenants[n][c]) for n in names]
    combos = 1
    for o in options:
        combos *= max(1, len(o))
    if combos <= 20_000:
        best: dict[str, Candidate] = {}
        best_score = -1.0
        for pick in itertools.product(*options):
            assignment = dict(zip(names, pick, strict=True))
            value = score(assignment)
            if value > best_score:
                best, best_score = assignment, value
        return best
    greedy: dict[str, Candidate] = {}
    for n, opts in sorted(zip(names, options, strict=True), key=lambda p: -max(tenants[p[0]].values())):
        greedy[n] = max(opts, key=lambda c: score({**greedy, n: c}))
    return greedy


def shortlist(
    measured: Mapping[str, Mapping[Candidate, float]], per_tenant: int = 2
) -> dict[str, list[Candidate]]:
    """Each tenant's best solo candidates: what is worth measuring together."""
    return {
        name: sorted(figures, key=lambda c: -figures[c])[:per_tenant] for name, figures in measured.items()
    }


ProfileFn = Callable[[Model, str, str, int], float]

"""Auto-placement: profile a model on every available backend/device, then place tenants.

The paper's second technique: put each model where it runs best and spread competing models across
accelerators. Profiles are short warm benchmarks (the tenant's instance count, batch 1, pre-made
tensors), cached in SQLite keyed by model sha256, backend, device and instances, so a placement is
profiled once per model version and machine.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

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
        try:
            backend = registry.get(backend_name)
            sessions = [
                backend.load(model.artifacts, device, {"threads": 1, "instances": instances})
                for _ in range(instances)
            ]
        except BackendError as exc:
            log.warning("cannot profile %s on %s:%s: %s", model.name, backend_name, device, exc)
            return 0.0
        h, w = model.input.size
        shape = (1, 3, h, w) if model.input.layout == "NCHW" else (1, h, w, 3)
        x = np.zeros(shape, np.dtype(model.input.dtype))
        counts = [0] * instances
        try:
            for s in sessions:
                s.infer(x)  # warm-up
            stop = time.perf_counter() + self.seconds

            def loop(i: int) -> None:
                while time.perf_counter() < stop:
                    sessions[i].infer(x)
                    counts[i] += 1

            threads = [threading.Thread(target=loop, args=(i,)) for i in range(instances)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(counts) / (time.perf_counter() - started)
        except BackendError as exc:
            log.warning("profiling %s on %s:%s failed: %s", model.name, backend_name, device, exc)
            return 0.0
        finally:
            for s in sessions:
                s.close()


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


ProfileFn = Callable[[Model, str, str, int], float]

"""Live per-tenant counters and latency windows for telemetry (thread-safe, bounded memory)."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


class TenantStats:
    WINDOW = 4096  # most recent latencies kept for percentiles

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.frames_in = 0
        self.frames_out = 0
        self.errors = 0
        self.drops = 0
        self.stalls = 0  # batches answered because the runtime call did not return in time
        self._latencies: deque[tuple[float, float]] = deque(maxlen=self.WINDOW)  # (monotonic, ms)
        self._batches: deque[int] = deque(maxlen=1024)

    def frame_in(self) -> None:
        with self._lock:
            self.frames_in += 1

    def served(self, total_ms: float) -> None:
        with self._lock:
            self.frames_out += 1
            self._latencies.append((time.monotonic(), total_ms))

    def error(self) -> None:
        with self._lock:
            self.errors += 1

    def dropped(self) -> None:
        with self._lock:
            self.drops += 1

    def stall(self) -> None:
        with self._lock:
            self.stalls += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self._batches.append(size)

    def snapshot(self, window_s: float) -> dict[str, float | int | dict[str, float]]:
        now = time.monotonic()
        with self._lock:
            recent = [ms for t, ms in self._latencies if now - t <= window_s]
            batches = list(self._batches)
            counts = (self.frames_in, self.frames_out, self.errors, self.drops, self.stalls)
        lat = np.asarray(recent, np.float64)
        pct = (
            {
                "p50": float(np.percentile(lat, 50)),
                "p95": float(np.percentile(lat, 95)),
                "p99": float(np.percentile(lat, 99)),
            }
            if lat.size
            else {"p50": 0.0, "p95": 0.0, "p99": 0.0}
        )
        return {
            "frames_in": counts[0],
            "frames_out": counts[1],
            "errors": counts[2],
            "drops": counts[3],
            "stalls": counts[4],
            "fps": lat.size / window_s if window_s > 0 else 0.0,
            "latency_ms": {k: round(v, 3) for k, v in pct.items()},
            "batch_size_mean": float(np.mean(batches)) if batches else 0.0,
        }

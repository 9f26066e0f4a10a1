"""Live per-tenant counters, latency histograms and windows for telemetry (thread-safe, bounded memory).

Two readers, neither disturbing the other: telemetry takes `snapshot(window)` every few seconds, and
Prometheus reads the counters and cumulative histograms (`histograms()`) at every scrape. Throughput
comes from counters (results per second, counted in one-second buckets), so it has no ceiling; the
latency window (the most recent 4096 results) is only for telemetry's percentiles. The counters are
the protocol's `TenantCounters` (one typed schema for telemetry and both /metrics endpoints).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque

import numpy as np
from pydantic import Field

from agent.protocol.schemas import Percentiles, TenantCounters, TenantWindow

# Latency histogram bounds in seconds (Prometheus convention): 0.5 ms .. 10 s.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("queue", "preprocess", "infer", "total")


class Snapshot(TenantWindow):
    """A tenant's window as telemetry sends it, plus how many results its percentiles come from
    (not sent: 0 tells Home Assistant there is no latency to show, rather than a 0 ms one)."""

    latency_samples: int = Field(default=0, exclude=True)


class Histogram:
    """Cumulative-ready bucket counts plus sum and count (not thread-safe: the owner locks)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """[(le, cumulative count), ..., ("+Inf", count)] and the sum."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), total))
        return out, self.sum


class TenantStats:
    WINDOW = 4096  # most recent latencies kept for telemetry's percentiles
    RATE_BUCKETS = 600  # seconds of per-second result counts kept (windows up to 10 minutes)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = TenantCounters()  # mutated under the lock; read through counters()
        self._latencies: deque[tuple[float, float]] = deque(maxlen=self.WINDOW)  # (monotonic, ms)
        self._batches: deque[int] = deque(maxlen=1024)
        self._per_second: deque[list[int]] = deque(maxlen=self.RATE_BUCKETS)  # [second, results]
        self.latency = {stage: Histogram(LATENCY_BUCKETS_S) for stage in STAGES}
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self._objective: deque[tuple[float, bool]] = deque(maxlen=self.WINDOW)  # (monotonic, in time)

    def frame_in(self) -> None:
        with self._lock:
            self._counts.frames_in += 1

    def served(
        self,
        total_ms: float,
        queue_ms: float | None = None,
        preprocess_ms: float | None = None,
        infer_ms: float | None = None,
    ) -> None:
        now = time.monotonic()
        second = int(now)
        with self._lock:
            self._counts.frames_out += 1
            self._latencies.append((now, total_ms))
            if self._per_second and self._per_second[-1][0] == second:
                self._per_second[-1][1] += 1
            else:
                self._per_second.append([second, 1])
            self.latency["total"].observe(total_ms / 1000.0)
            for stage, ms in (("queue", queue_ms), ("preprocess", preprocess_ms), ("infer", infer_ms)):
                if ms is not None:
                    self.latency[stage].observe(ms / 1000.0)

    def objective(self, total_ms: float, own_ms: float, objective_ms: float) -> None:
        """A result of a tenant with an objective: within it, or late because it waited to start
        (its own serving, `own_ms`, would have fitted) or because its serving alone ran over."""
        now = time.monotonic()
        with self._lock:
            if total_ms <= objective_ms:
                self._counts.within_objective += 1
            elif own_ms <= objective_ms:
                self._counts.missed_queueing += 1
            else:
                self._counts.missed_inference += 1
            self._objective.append((now, total_ms <= objective_ms))

    def shed(self) -> None:
        with self._lock:
            self._counts.shed += 1
            self._objective.append((time.monotonic(), False))

    def error(self) -> None:
        with self._lock:
            self._counts.errors += 1

    def dropped(self) -> None:
        with self._lock:
            self._counts.drops += 1

    def stall(self) -> None:
        with self._lock:
            self._counts.stalls += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self._batches.append(size)
            self.batch_sizes.observe(size)

    def histograms(self) -> dict[str, tuple[list[tuple[str, int]], float]]:
        """Per stage (and "batch_size"): cumulative buckets and sum, for Prometheus (read-only)."""
        with self._lock:
            out = {stage: h.cumulative() for stage, h in self.latency.items()}
            out["batch_size"] = self.batch_sizes.cumulative()
        return out

    def counters(self) -> TenantCounters:
        """A copy of the counters (Prometheus reads them at every scrape)."""
        with self._lock:
            return self._counts.model_copy()

    def __getattr__(self, name: str) -> int:
        """`stats.frames_out` and the other counters, read as attributes."""
        if name in TenantCounters.model_fields:
            return int(getattr(self.counters(), name))
        raise AttributeError(name)

    def fps(self, window_s: float) -> float:
        """Results per second over the last `window_s` (whole seconds; the current one partly)."""
        if window_s <= 0:
            return 0.0
        now = time.monotonic()
        first = int(now - window_s) + 1  # the oldest whole-second bucket inside the window
        if now - first < window_s / 2:  # short windows: one bucket more than a part of one
            first -= 1
        with self._lock:
            count = sum(n for second, n in self._per_second if second >= first)
        return count / (now - first)

    def snapshot(self, window_s: float) -> Snapshot:
        """The counters and the last `window_s` seconds' throughput, percentiles and mean batch."""
        now = time.monotonic()
        with self._lock:
            recent = [ms for t, ms in self._latencies if now - t <= window_s]
            batches = list(self._batches)
            counts = self._counts.model_dump()
            judged = [ok for t, ok in self._objective if now - t <= window_s]
        lat = np.asarray(recent, np.float64)
        pct = (
            Percentiles(**{f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 95, 99)})
            if lat.size
            else Percentiles()
        )
        return Snapshot(
            **counts,
            fps=self.fps(window_s),  # from counts, not from the latency window: no ceiling
            latency_ms=pct,
            batch_size_mean=float(np.mean(batches)) if batches else 0.0,
            latency_samples=int(lat.size),
            objective_share=round(sum(judged) / len(judged), 4) if judged else None,
        )

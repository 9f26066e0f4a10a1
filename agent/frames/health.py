"""Health of accelerators and the hand-off of frames during a failover (docs/reliability.md).

`Relay`: where a failing tenant's frames go (queued ones, those caught in a hung or failed call,
new arrivals) while the next candidate loads; connected to it once it serves, every frame held is
run there. Each frame gets one answer: the old tenant drops what it would still answer for them.

`Health`: one (backend, device) seen from the agent: unhealthy after a stall, runtime errors, a
failed load or a slow drift; probed while idle (backoff doubling per failure) until a probe passes,
then healthy since that moment; failback waits until it has been healthy long enough. Kept per
`device_key`, so `GPU` and `GPU.0` are one accelerator. What to do about it is decided in
agent/placement/failover_policy.py.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from agent.frames.faults import Fault
from agent.frames.ingest import Frame
from agent.protocol.schemas import Candidate, ErrorCode
from backends import isolation
from backends.base import Backend, ModelArtifacts

log = logging.getLogger(__name__)

Reject = Callable[[Frame, ErrorCode, str], None]


class Target(Protocol):
    def take_over(self, frame: Frame) -> None:
        """Run a relayed frame (counted once, where it was routed: not again here)."""


class Relay:
    """Frames in transit from a failing tenant to the next candidate (thread-safe)."""

    def __init__(self, reject: Reject, depth: int) -> None:
        self._reject = reject  # answers a frame that cannot be moved (the old tenant's stats)
        self._depth = depth
        self._lock = threading.Lock()
        self._held: list[Frame] = []
        self._target: Target | None = None
        self._failed: str | None = None
        self._code: ErrorCode = "unavailable"
        self.moved = 0  # frames handed on to the new tenant

    def put(self, frames: list[Frame]) -> None:
        with self._lock:
            for frame in frames:
                if self._target is not None:
                    self.moved += 1
                    self._target.take_over(frame)
                elif self._failed is not None:
                    self._reject(frame, self._code, self._failed)
                else:
                    self._held.append(frame)
                    if len(self._held) > self._depth:
                        oldest = self._held.pop(0)
                        self._reject(
                            oldest, "overloaded", f"dropped as the oldest of {self._depth} frames held"
                        )

    def connect(self, target: Target) -> None:
        """Every frame held, and every later one, goes to `target`."""
        with self._lock:
            self._target, held, self._held = target, self._held, []
            for frame in held:
                self.moved += 1
                target.take_over(frame)

    def fail(self, message: str, code: ErrorCode = "unavailable") -> None:
        """No candidate could take the frames: held and later ones are answered `code`."""
        with self._lock:
            self._failed, self._code, held, self._held = message, code, self._held, []
            for frame in held:
                self._reject(frame, code, message)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)


_INDEXED = re.compile(r"^(?P<kind>[a-z_-]+)(?:[:.](?P<index>\d+))?$")


def device_key(backend: str, device: str) -> str:
    """The one key of an accelerator: lower case, a kind without an index is its first one (`GPU`,
    `GPU.0` and `gpu:0` are one device; so are `cuda` and `cuda:0`), as backends resolve it."""
    name = device.strip().lower()
    match = _INDEXED.match(name)
    if match is not None:
        name = f"{match['kind']}:{match['index'] or 0}"
    return f"{backend.strip().lower()}/{name}"


@dataclass
class Health:
    """One accelerator (backend, device) as the agent sees it (event loop only)."""

    label: str
    healthy: bool = True
    reason: str = ""
    since: float = field(default_factory=time.monotonic)  # healthy or unhealthy since
    failures: int = 0  # in a row, for the backoff; reset once serving steadily again
    retry_at: float = 0.0  # no probe before this
    probing: bool = False
    # "stall" or "error" while unhealthy for a sign about the device itself (every tenant on it
    # moves); a failed load or a drift may be one model's alone.
    kind: str = ""

    def fail(
        self, reason: str, base_s: float, max_s: float, now: float | None = None, kind: str = ""
    ) -> None:
        now = time.monotonic() if now is None else now
        if self.healthy:
            self.since, self.kind = now, ""
        self.healthy, self.reason = False, reason
        self.kind = kind or self.kind
        self.failures += 1
        self.retry_at = now + self.backoff(base_s, max_s)

    def backoff(self, base_s: float, max_s: float) -> float:
        """`base_s` doubled per failure in a row, capped: the probe interval and the failback hold."""
        return min(max_s, base_s * 2 ** max(0, self.failures - 1))

    def forget_failures(self) -> None:
        """Serving steadily again: the next failure's backoff starts over."""
        self.failures = 0

    def probe_started(self) -> None:
        self.probing = True

    def probe_finished(self) -> None:
        """The probe's call has really returned (a hung one is not followed by another)."""
        self.probing = False

    def passed(self, now: float | None = None) -> None:
        """A probe passed: healthy from now (failback counts from here)."""
        self.healthy, self.reason, self.since = True, "", time.monotonic() if now is None else now
        self.kind = ""

    @property
    def device_fault(self) -> bool:
        return not self.healthy and self.kind in ("stall", "error")

    def due(self, now: float) -> bool:
        return not self.healthy and not self.probing and now >= self.retry_at


class HealthBook:
    """Health per accelerator, keyed by `device_key` (event loop only)."""

    def __init__(self) -> None:
        self._by_key: dict[str, Health] = {}

    def __getitem__(self, candidate: Candidate) -> Health:
        key = device_key(candidate.backend, candidate.device)
        return self._by_key.setdefault(key, Health(key))

    def of(self, candidates: Sequence[Candidate]) -> Mapping[str, Health]:
        """The health of every accelerator, `candidates` recorded from now on if they were not
        (a healthy one's failback hold counts from its first sighting)."""
        for candidate in candidates:
            self[candidate]
        return self._by_key


PROBE_RUNS = 4  # one warm-up, then the median of three


def probe(
    backend: Backend,
    artifacts: ModelArtifacts,
    device: str,
    fault: Fault | None,
    options: Mapping[str, Any] | None = None,
) -> float:
    """Load one instance of the model on `device`, run zero frames, close: the median milliseconds
    of one inference (after a warm-up run). Blocking; raises what the runtime raises (the caller
    runs it under a deadline)."""
    h, w = artifacts.input_size
    item = (3, h, w) if artifacts.layout == "NCHW" else (h, w, 3)
    # The tenant's own precision and threads (an int8-only model loads only as int8), one instance.
    session = isolation.load(backend, artifacts, device, {**(options or {}), "instances": 1, "max_batch": 1})
    try:
        frame = np.zeros((1, *item), np.dtype(artifacts.dtype))
        timings = []
        for run in range(PROBE_RUNS):  # the first call of a fresh session warms it up: not timed
            started = time.monotonic()  # an injected slowdown counts, as it does when serving
            if fault is not None:
                fault.inject(0)
            session.infer(frame)
            if run:
                timings.append((time.monotonic() - started) * 1000.0)
        return float(np.median(timings))
    finally:
        session.close()


class DriftWatch:
    """Latency far above the tenant's own baseline on this candidate (thread-safe).

    The baseline is the median per-frame inference time of the first `warmup` batches; drift is the
    median of the last `window` batches above `factor` times it.
    """

    def __init__(self, factor: float, warmup: int = 50, window: int = 30) -> None:
        self.factor = factor
        self.warmup = warmup
        self.window = window
        self._lock = threading.Lock()
        self._first: list[float] = []
        self._recent: list[float] = []
        self.baseline_ms: float | None = None

    def add(self, per_frame_ms: float) -> float | None:
        """Record one batch; the recent median when it drifted, else None."""
        if self.factor <= 0:
            return None
        with self._lock:
            if self.baseline_ms is None:
                self._first.append(per_frame_ms)
                if len(self._first) >= self.warmup:
                    self.baseline_ms = float(np.median(self._first))
                return None
            self._recent.append(per_frame_ms)
            if len(self._recent) > self.window:
                self._recent.pop(0)
            if len(self._recent) < self.window:
                return None
            recent = float(np.median(self._recent))
            return recent if recent > self.factor * max(self.baseline_ms, 0.5) else None

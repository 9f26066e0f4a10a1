"""Scheduling for latency objectives, pure: which queued frames form the next batch, which are shed.

The batching loop (tenant_worker.py) asks `plan` each time an instance is free; nothing here reads a
clock, takes a lock or touches a frame, so every rule is a table-driven unit test
(tests/test_slo_policy.py). The rules (docs/protocol.md "Latency objectives"):

- Order: higher priority first, then earliest deadline first, then arrival.
- Shed: a frame that can no longer meet its deadline is answered at once (`shed`), not late. A
  high-priority frame only when it would miss even if it ran next on its own; normal and low
  priority ones also when the frames ahead of them leave no time (predicted from the backlog), low
  priority with a margin, so that under overload low priority goes first.
- Batch size: the largest batch (up to `max_size`) whose measured time still fits the tightest
  deadline among its frames; larger batches serve more per second but each of their frames waits
  for the whole batch.

`LatencyTable` is the measured time of one batch per batch size (the median of its recent
batches), kept up to date by the worker from each batch it serves; `estimate` fills sizes not yet
seen from the nearest one measured. When nothing was served for a while, `plan(explore=True)` runs
one frame the estimate would shed, so that a figure stuck high is measured again.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
# Low priority frames are shed when the predicted finish is within this factor of their deadline:
# under overload they go before normal and high priority ones do.
LOW_PRIORITY_MARGIN = 1.5

Estimate = Callable[[int], float | None]  # batch size -> ms for one batch, None when unknown


@dataclass(frozen=True)
class Item:
    """What the policy knows of one queued frame (times in seconds, one monotonic clock)."""

    arrival: float
    deadline: float | None  # None: no objective (never shed, orders last within its priority)
    priority: int = PRIORITIES["normal"]


@dataclass(frozen=True)
class Decision:
    take: list[int] = field(default_factory=list)  # indexes into the queued items, in serve order
    shed: list[int] = field(default_factory=list)  # indexes to answer `shed` now


def order_key(item: Item) -> tuple[int, float, float]:
    """Higher priority first, then earliest deadline, then arrival."""
    return (item.priority, math.inf if item.deadline is None else item.deadline, item.arrival)


def plan(
    items: Sequence[Item],
    now: float,
    max_size: int,
    estimate: Estimate,
    servers: int = 1,
    explore: bool = False,
) -> Decision:
    """The next batch and the frames to shed, for an instance free at `now`.

    `servers` is how many instances serve the queue (the backlog drains that much faster).
    `explore`: nothing was served for a while; the first frame that only the estimate would shed
    (its deadline not passed yet) runs instead, so that an estimate stuck high (one slow batch, a
    device that recovered) is measured again rather than shedding every frame from then on.
    """
    if not items:
        return Decision()
    order = sorted(range(len(items)), key=lambda i: order_key(items[i]))
    one_s = (estimate(1) or 0.0) / 1000.0
    full_s = (estimate(max_size) or 0.0) / 1000.0
    per_round = max(1, max_size) * max(1, servers)
    kept: list[int] = []
    shed: list[int] = []
    for index in order:
        item = items[index]
        if item.deadline is None:
            kept.append(index)
            continue
        if now + one_s > item.deadline:  # even alone and next, it would be late
            if explore and not kept and now <= item.deadline:
                kept.append(index)
                continue
            shed.append(index)
            continue
        if item.priority > PRIORITIES["high"]:
            # The frames kept ahead of it are served first, `per_round` per batch time.
            wait = full_s * (len(kept) // per_round) + one_s
            margin = LOW_PRIORITY_MARGIN if item.priority >= PRIORITIES["low"] else 1.0
            if now + wait * margin > item.deadline:
                shed.append(index)
                continue
        kept.append(index)
    return Decision(take=kept[: batch_size(items, kept, now, max_size, estimate)], shed=shed)


def batch_size(
    items: Sequence[Item], kept: Sequence[int], now: float, max_size: int, estimate: Estimate
) -> int:
    """The largest n <= max_size whose batch time fits the tightest deadline of its first n frames
    (at least 1 when any frame is kept: a frame that fits alone was not shed)."""
    size = min(max_size, len(kept))
    tightest = math.inf
    best = 1 if kept else 0
    for n in range(1, size + 1):
        deadline = items[kept[n - 1]].deadline
        if deadline is not None:
            tightest = min(tightest, deadline)
        ms = estimate(n)
        if ms is not None and now + ms / 1000.0 > tightest:
            break
        best = n
    return best


class LatencyTable:
    """Milliseconds of one batch (preprocessing and inference) per batch size, as measured (thread-safe).

    The figure per size is the median of its last `window` batches: it follows a device that slows
    down or speeds up within a few batches, and one slow batch (another process's burst, a page
    fault) does not move it. (A mean did: on a busy 2-core machine one 200 ms batch lifted a 15 ms
    figure over 50 ms, and the frames shed for it would have made their objective.) A batch under
    half the figure starts it again: the figure came from slow outliers, or the device recovered.
    A size not measured yet is estimated from the nearest measured one, per frame.
    """

    def __init__(self, window: int = 16) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._samples: dict[int, deque[float]] = {}
        self._ms: dict[int, float] = {}

    def update(self, size: int, ms: float) -> None:
        """One batch of `size` took `ms`."""
        if size < 1 or not math.isfinite(ms) or ms < 0:
            return
        with self._lock:
            samples = self._samples.get(size)
            if samples is None or ms < self._ms[size] / 2:
                samples = self._samples[size] = deque(maxlen=self.window)
            samples.append(ms)
            self._ms[size] = statistics.median(samples)

    def measured(self) -> dict[int, float]:
        with self._lock:
            return dict(self._ms)

    def estimate(self, size: int) -> float | None:
        """Expected ms of a batch of `size`; None while nothing is measured."""
        with self._lock:
            known = self._ms.get(size)
            if known is not None:
                return known
            if not self._ms:
                return None
            nearest = min(self._ms, key=lambda s: (abs(s - size), s))
            return self._ms[nearest] / nearest * size

    def per_frame(self, size: int) -> float | None:
        """Expected ms per frame at batch `size` (the failover drift check compares like with like)."""
        ms = self.estimate(size)
        return None if ms is None else ms / size

"""A tenant's bounded frame queue with Triton-style dynamic batching.

Instance worker threads pull from one shared queue, so a frame goes to the first free instance.
`get_batch` returns as soon as `max_size` frames are there, or `max_delay` after it picked the
first one, whichever comes first. The queue never holds more than `depth` frames: on overflow it
either drops the oldest (returned to the caller, who answers it `overloaded`) or refuses the new one.
A tenant with a latency objective takes its batches with `get_planned` instead: the objective
policy (slo_policy.py) picks the batch and the frames to shed from everything queued.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """`reject_new` policy: the queue is at its depth."""


class QueueClosed(Exception):
    """The tenant is draining or stopped and takes no new frames."""


class BatchQueue(Generic[T]):
    def __init__(self, depth: int, policy: Literal["drop_oldest", "reject_new"] = "drop_oldest") -> None:
        self.depth = depth
        self.policy = policy
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> T | None:
        """Enqueue; returns the item dropped to make room (drop_oldest), if any."""
        with self._cond:
            if self._closed:
                raise QueueClosed
            dropped = None
            if len(self._items) >= self.depth:
                if self.policy == "reject_new":
                    raise QueueFull
                dropped = self._items.popleft()
            self._items.append(item)
            self._cond.notify()
            return dropped

    def put_many(self, items: list[T]) -> tuple[list[T], list[T]]:
        """Enqueue together (one wake-up, so one free instance takes them as one batch); returns the
        items dropped to make room (drop_oldest) and the ones refused (reject_new)."""
        with self._cond:
            if self._closed:
                raise QueueClosed
            dropped: list[T] = []
            refused: list[T] = []
            for item in items:
                if len(self._items) >= self.depth:
                    if self.policy == "reject_new":
                        refused.append(item)
                        continue
                    dropped.append(self._items.popleft())
                self._items.append(item)
            self._cond.notify()
            return dropped, refused

    def get_batch(self, max_size: int, max_delay_s: float, poll_s: float | None = None) -> list[T] | None:
        """Up to `max_size` items; [] when `poll_s` passed with nothing; None once closed and empty."""
        with self._cond:
            deadline_first = None if poll_s is None else time.monotonic() + poll_s
            while not self._items:
                if self._closed:
                    return None
                remaining = None if deadline_first is None else deadline_first - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)
            batch = [self._items.popleft()]
            deadline = time.monotonic() + max_delay_s
            while len(batch) < max_size:
                if self._items:
                    batch.append(self._items.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._items:
                self._cond.notify()  # more work left: wake another instance
            return batch

    def get_planned(
        self, choose: Callable[[list[T]], tuple[list[int], list[int]]], max_size: int, max_delay_s: float
    ) -> tuple[list[T], list[T]] | None:
        """(batch, shed) as `choose` picks them from everything queued (indexes to take in order,
        indexes to shed); None once closed and empty. Waits for a first item, then up to
        `max_delay_s` for `max_size` of them, as `get_batch` does."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + max_delay_s
            while len(self._items) < max_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            items = list(self._items)
            take, shed = choose(items)
            gone = set(take) | set(shed)
            self._items = deque(item for i, item in enumerate(items) if i not in gone)
            if self._items:
                self._cond.notify()  # more work left: wake another instance
            return [items[i] for i in take], [items[i] for i in shed]

    def close(self) -> None:
        """Take no new items; workers finish what is queued, then see None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take_all(self) -> list[T]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items


def warmup_batch_sizes(max_size: int) -> list[int]:
    """Every size up to 8, then powers of two, and the largest: the sizes dynamic batching makes."""
    sizes = set(range(1, min(max_size, 8) + 1))
    size = 16
    while size < max_size:
        sizes.add(size)
        size *= 2
    sizes.add(max_size)
    return sorted(sizes)

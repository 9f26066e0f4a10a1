"""Recent request ids: a frame that arrives again is not run again (docs/protocol.md, "Duplicates").

MQTT delivers QoS 1 at least once: a broker that restarts before it saw the agent's PUBACK sends
the frame again, and a camera whose PUBLISH was not acknowledged sends it again too. "Every frame
gets exactly one answer" means neither may run twice. This memory keeps, per (model, request id)
of frames that carry the caller's own id, whether the frame is still in flight and, once served,
its answer. Bounded by count, bytes and age (the broker's redelivery window is the session expiry).
Thread-safe: answers are settled from tenant worker threads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

W = TypeVar("W")  # what waits for an answer (the router's frames)
Key = tuple[str, str]  # (model, request id)


@dataclass
class _Entry(Generic[W]):
    at: float
    answer: bytes | None = None  # the served result, once there is one
    waiters: list[W] = field(default_factory=list)  # repeats that arrived while it was in flight


@dataclass(frozen=True)
class First:
    """Not seen recently: run it."""


@dataclass(frozen=True)
class InFlight:
    """The same id is being served; the repeat was attached (if asked) and gets the same answer."""


@dataclass(frozen=True)
class Answered:
    """Served already: `answer` is the result payload as it was published."""

    answer: bytes


Seen = First | InFlight | Answered


class RecentRequests(Generic[W]):
    def __init__(
        self,
        max_entries: int = 20_000,
        max_age_s: float = 3600.0,
        max_bytes: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[Key, _Entry[W]] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_age_s > 0

    def __len__(self) -> int:
        return len(self._entries)

    def arrive(self, key: Key, waiter: W | None) -> Seen:
        """A frame with this key arrived. `waiter` (or None) is attached when it is in flight."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(now)
                self._trim()
                return First()
            if entry.answer is not None:
                return Answered(entry.answer)
            if waiter is not None:
                entry.waiters.append(waiter)
            return InFlight()

    def settle(self, key: Key, answer: bytes | None) -> list[W]:
        """The frame with this key was answered: keep `answer` (a served result) to send again, or
        forget the key (None: an error, so that a retry runs). Returns the attached repeats."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return []
            waiters, entry.waiters = entry.waiters, []
            if answer is None:
                del self._entries[key]
            elif entry.answer is None:
                entry.answer = answer
                self._bytes += len(answer)
                self._trim()
            return waiters

    def learn(self, key: Key, answer: bytes) -> None:
        """Another device served this key (a pool member, docs/pools.md): a repeat that reaches this
        device gets that answer. A key in flight here is left to its own answer."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            if key in self._entries:
                return
            self._entries[key] = _Entry(now, answer)
            self._bytes += len(answer)
            self._trim()

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.at <= self.max_age_s or entry.answer is None:
                return  # (one in flight is answered within the inference timeout, then expires)
            self._drop(key, entry)

    def _trim(self) -> None:
        """Oldest answered entries go first; one in flight is kept (its tenant's queue bounds them)."""
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            for key, entry in self._entries.items():
                if entry.answer is not None:
                    self._drop(key, entry)
                    break
            else:
                return

    def _drop(self, key: Key, entry: _Entry[W]) -> None:
        del self._entries[key]
        if entry.answer is not None:
            self._bytes -= len(entry.answer)

"""Priority across tenants: one admission gate per accelerator, in front of the runtimes sharing it.

Each tenant schedules its own queue (slo_policy.py), so without this a flooded low priority tenant
keeps the shared cores busy while a high priority one on the same cores misses its objective.
Before a worker starts a batch (preprocessing and inference) it takes run slots from the gate of
its resource (the host CPU, a GPU), and gives them back when the batch is answered. The rules
(`admit`, pure; docs/protocol.md "Latency objectives"):

- Slots: the host CPU has one per core; a batch takes as many as its runtime has threads (all of
  them when its runtime sizes its own pool). Another accelerator has one per instance of its
  busiest tenant.
- Waiters are admitted higher priority first, then earliest deadline; none overtakes one that waits.
- The highest priority present never waits: a running lower priority batch cannot be stopped, and
  waiting behind it would make the frame late, so it runs beside it.
- A lower priority batch starts only when the slots left after the batches running (of its own
  priority and above) and after those a higher priority tenant needs for its queued frames (its
  idle instances, one batch each) still hold it.
- Headroom on the host CPU: while a higher priority tenant with a latency objective is active (it
  runs, has frames queued, or its last batch ended less than a hold-off ago), a lower priority
  batch also leaves one core to the agent's own work (receiving, decoding, the broker) when there
  are two or more, and counts one batch of that tenant as needed even in its short idle moments.
  With two cores and one thread each, the low batch then runs only in the high tenant's idle gaps.
  The hold-off is the tenant's last batch time, at most its objective: short, so that a high tenant
  busy at low utilisation still leaves gaps a low batch starts in (low frames that cannot make
  their objective are shed as always), yet long enough to span the moment between one of its
  batches and the next, when its queue is briefly empty.
- Tenants of one priority only (the usual case): every batch is admitted at once, as before, and
  the workers do not even ask (`Gate.active`).

A batch that waits at the gate keeps the frames that can still make their objective; the rest are
answered `shed` when they can no longer make it even if served next (`wait_for_slots`), not late.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from agent.frames.slo_policy import PRIORITIES
from agent.protocol.schemas import TenantSpec

HOST = "cpu"  # the resource name backends give the host CPU (backends/base.py BackendInfo.resource)
# A waiter also looks again this often: a higher priority tenant's queue can empty (its frames shed)
# without any batch starting or ending.
RECHECK_S = 0.05
# How much lower the OS priority (nice) of a low priority tenant's worker threads on the host CPU is
# than the agent's: when they share the cores with higher priority work they get about a tenth.
LOW_NICE = 10
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """What the rules know of one tenant on the resource."""

    key: str
    priority: int
    weight: int  # slots one of its batches takes
    instances: int
    max_batch: int
    queued: int = 0  # frames in its queue
    running: int = 0  # its batches holding slots
    objective: bool = False  # it has a latency objective on the host CPU: lower batches leave headroom
    recent: bool = False  # its last batch ended within its hold-off (counts only with `objective`)


@dataclass(frozen=True)
class Waiter:
    ticket: int  # arrival order at the gate
    member: str
    deadline: float | None = None  # its batch's tightest deadline (monotonic s); None: no objective


def admit(waiters: Sequence[Waiter], members: Sequence[Member], capacity: int) -> list[int]:
    """The tickets of `waiters` to admit now, in order (see the module docstring for the rules)."""
    by_key = {m.key: m for m in members}
    present = [m.priority for m in members]
    if not waiters or not present:
        return []
    top = min(present)
    waiting: dict[str, int] = {}
    for w in waiters:
        waiting[w.member] = waiting.get(w.member, 0) + 1
    held = {m.key: m.weight * m.running for m in members}

    def order(w: Waiter) -> tuple[int, float, int]:
        member = by_key.get(w.member)
        priority = top if member is None else member.priority
        return (priority, math.inf if w.deadline is None else w.deadline, w.ticket)

    out: list[int] = []
    for w in sorted(waiters, key=order):
        member = by_key.get(w.member)
        if member is None or member.priority == top:  # a tenant that left is not held back either
            out.append(w.ticket)
            if member is not None:
                held[member.key] += member.weight
            continue
        higher = [m for m in members if m.priority < member.priority]
        busy = sum(held[m.key] for m in members if m.priority <= member.priority)
        reserve = sum(_needs(m, waiting.get(m.key, 0)) for m in higher)
        if capacity >= 2 and any(_guarded(m, held[m.key], waiting.get(m.key, 0)) for m in higher):
            reserve += 1  # a core for the agent's own work beside the objective's batches
        if busy + reserve + member.weight > capacity:
            break  # nothing lower overtakes it
        out.append(w.ticket)
        held[member.key] += member.weight
    return out


def _needs(member: Member, waiting: int) -> int:
    """Slots a tenant's queued frames would take now: one batch per idle instance (not running,
    not already waiting at the gate) while it has frames for it."""
    idle = max(0, member.instances - member.running - waiting)
    queued = max(member.queued, 1 if member.objective and member.recent and not member.running else 0)
    return member.weight * min(idle, -(-queued // member.max_batch))


def _guarded(member: Member, held: int, waiting: int) -> bool:
    """A tenant with an objective on the host CPU that is active: lower batches leave it headroom."""
    return member.objective and bool(held or waiting or member.queued or member.recent)


def weight(spec: TenantSpec, resource: str, capacity: int) -> int:
    """Slots one batch of `spec` takes: its runtime threads on the host CPU (all of them when the
    runtime sizes its own pool), one elsewhere."""
    if resource != HOST:
        return 1
    return max(1, min(capacity, spec.threads or capacity))


class Gate:
    """The run slots of one resource (thread-safe)."""

    def __init__(self, resource: str, cores: int) -> None:
        self.resource = resource
        self.cores = cores
        self.active = False  # tenants of more than one priority here: batches ask for slots
        self._cond = threading.Condition()
        self._members: dict[int, tuple[TenantSpec, Callable[[], int]]] = {}  # id -> spec, queued
        self._running: dict[int, int] = {}
        self._waiters: list[tuple[Waiter, int]] = []  # with the member's id
        self._tickets = 0
        self._started: dict[int, float] = {}  # member -> when its latest batch was admitted
        self._ended: dict[int, tuple[float, float]] = {}  # member -> its last batch's end, hold-off

    def capacity(self) -> int:
        if self.resource == HOST:
            return max(1, self.cores)
        return max([spec.instances for spec, _ in self._members.values()] or [1])

    def join(self, member: int, spec: TenantSpec, queued: Callable[[], int]) -> None:
        with self._cond:
            self._members[member] = (spec, queued)
            self._running.setdefault(member, 0)
            self._changed()

    def leave(self, member: int) -> None:
        """The tenant stops (drain): its waiters are let through, nothing holds others back for it."""
        with self._cond:
            self._members.pop(member, None)
            self._ended.pop(member, None)
            self._started.pop(member, None)
            self._changed()

    def _changed(self) -> None:
        self.active = len({PRIORITIES[spec.priority] for spec, _ in self._members.values()}) > 1
        self._cond.notify_all()

    def _objective(self, spec: TenantSpec) -> bool:
        return self.resource == HOST and spec.latency_objective_ms is not None

    def _holds(self, now: float) -> dict[int, float]:
        """Members whose last batch ended within their hold-off: when each hold-off ends."""
        return {
            member: end + hold
            for member, (end, hold) in self._ended.items()
            if now < end + hold and not self._running.get(member)
        }

    def _snapshot(self, holds: dict[int, float]) -> list[Member]:
        capacity = self.capacity()
        return [
            Member(
                key=str(member),
                priority=PRIORITIES[spec.priority],
                weight=weight(spec, self.resource, capacity),
                instances=spec.instances,
                max_batch=spec.batch.max_size,
                queued=queued(),
                running=self._running.get(member, 0),
                objective=self._objective(spec),
                recent=member in holds,
            )
            for member, (spec, queued) in self._members.items()
        ]

    def acquire(self, member: int, deadline: float | None, timeout_s: float | None) -> bool:
        """Wait for this batch's turn; False when `timeout_s` passed first."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            self._tickets += 1
            waiter = Waiter(self._tickets, str(member), deadline)
            self._waiters.append((waiter, member))
            try:
                while True:
                    now = time.monotonic()
                    holds = self._holds(now)
                    admitted = admit([w for w, _ in self._waiters], self._snapshot(holds), self.capacity())
                    if waiter.ticket in admitted:
                        self._running[member] = self._running.get(member, 0) + 1
                        self._started[member] = now
                        return True
                    # look again when the first hold-off ends (a higher tenant idle long enough)
                    left = min([RECHECK_S, *(until - now for until in holds.values())])
                    left = max(0.001, left) if end is None else min(left, end - now)
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._waiters.remove((waiter, member))
                self._cond.notify_all()

    def release(self, member: int) -> None:
        with self._cond:
            self._running[member] = max(0, self._running.get(member, 0) - 1)
            entry = self._members.get(member)
            if entry is not None and self._objective(entry[0]) and entry[0].latency_objective_ms:
                now = time.monotonic()
                took = now - self._started.get(member, now)
                self._ended[member] = (now, min(took, entry[0].latency_objective_ms / 1000.0))
            else:
                self._ended.pop(member, None)
            if member not in self._members and not self._running[member]:
                del self._running[member]
            self._cond.notify_all()


def wait_for_slots(
    gate: Gate,
    member: int,
    batch: list[T],
    deadline_of: Callable[[T], float | None],
    one_s: float,
    shed: Callable[[T], None],
) -> list[T]:
    """Wait at `gate` for `batch`'s turn: the frames to run once admitted (the slots are then held:
    `gate.release` after the batch), or [] when every frame was shed waiting (nothing held).

    A frame that can no longer make its deadline even served next (`one_s`, the measured time of a
    batch of one) is shed at that moment rather than answered late; frames without a deadline wait.
    """
    while batch:
        deadlines = [d for d in map(deadline_of, batch) if d is not None]
        latest = min(deadlines) - one_s if deadlines else None  # the first frame's last useful start
        timeout = None if latest is None else max(0.0, latest - time.monotonic())
        if gate.acquire(member, min(deadlines) if deadlines else None, timeout):
            return batch
        now = time.monotonic()
        keep: list[T] = []
        for frame in batch:
            deadline = deadline_of(frame)
            if deadline is not None and now + one_s >= deadline:
                shed(frame)
            else:
                keep.append(frame)
        batch = keep
    return batch


def yield_cores(gate: Gate, spec: TenantSpec) -> None:
    """On a worker thread of a low priority tenant on the host CPU: run it at a lower OS priority
    (nice `LOW_NICE` above the agent's), so that when its batch runs beside a higher priority one
    the kernel gives the cores to the other (and to the agent's event loop). Once per thread: a
    thread cannot take its priority back, and a tenant's priority does not change (a new priority
    is a new tenant)."""
    if gate.resource != HOST or spec.priority != "low":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + LOW_NICE))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: the gate alone orders it
        log.warning("tenant %s: could not lower its threads' priority: %s", spec.model, exc)


class GateBoard:
    """One gate per resource; tenants join the gate of theirs when they start and leave at the drain."""

    def __init__(self, cores: int | None = None, enabled: bool | None = None) -> None:
        self.cores = cores if cores is not None else _host_cores()
        # EDGE_AGENT_PRIORITY_GATE=0: each tenant only orders its own queue (the benchmark's "without").
        self.enabled = os.environ.get("EDGE_AGENT_PRIORITY_GATE", "1") != "0" if enabled is None else enabled
        self._lock = threading.Lock()
        self._gates: dict[str, Gate] = {}

    def gate(self, resource: str) -> Gate | None:
        """The gate of `resource`; None when the gates are turned off."""
        if not self.enabled:
            return None
        with self._lock:
            gate = self._gates.get(resource)
            if gate is None:
                gate = self._gates[resource] = Gate(resource, self.cores)
            return gate


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_BOARD = GateBoard()


def board() -> GateBoard:
    """The gates of this process: tenants on one accelerator share them whichever placement made them."""
    return _BOARD

"""Priority across tenants on one accelerator (agent/frames/priority_gate.py): the admission rules as
tables, then tenants on the fake runtime sharing a one-slot gate (docs/protocol.md "Latency objectives")."""

from __future__ import annotations

import threading
import time

import pytest

from agent.frames import priority_gate
from agent.frames.ingest import Frame
from agent.frames.priority_gate import (
    Gate,
    GateBoard,
    Member,
    Waiter,
    admit,
    wait_for_slots,
    weight,
    yield_cores,
)
from agent.frames.slo_policy import PRIORITIES
from agent.frames.tenant import Tenant
from agent.protocol.schemas import ErrorResult, InferResult, TenantSpec
from agent.service.model_repo import ModelRepository
from backends.fake import FakeBackend
from tests.conftest import MODELS, sample

H, N, L = PRIORITIES["high"], PRIORITIES["normal"], PRIORITIES["low"]


def m(key: str, priority: int, weight: int = 1, instances: int = 1, queued: int = 0, running: int = 0):
    return Member(key, priority, weight, instances, 1, queued, running)


@pytest.mark.parametrize(
    ("members", "waiters", "capacity", "admitted"),
    [
        # One priority only (the usual case): everything runs at once, whatever the slots.
        ([m("a", N, 2), m("b", N, 2)], [Waiter(1, "a"), Waiter(2, "b")], 2, [1, 2]),
        ([m("a", L, running=3)], [Waiter(1, "a"), Waiter(2, "a")], 1, [1, 2]),
        # The highest priority present never waits, not even for a low batch holding every slot.
        ([m("hi", H), m("lo", L, 2, running=1)], [Waiter(1, "hi")], 2, [1]),
        # A low batch waits while the high tenant runs on the only slot...
        ([m("hi", H, running=1), m("lo", L)], [Waiter(1, "lo")], 1, []),
        # ...and while it has frames queued for an idle instance (the slot is kept for them).
        ([m("hi", H, queued=3), m("lo", L)], [Waiter(1, "lo")], 1, []),
        # High queued, but its only instance is busy on its own slot and a second slot is free.
        ([m("hi", H, queued=3, running=1), m("lo", L)], [Waiter(1, "lo")], 2, [1]),
        # High idle: low runs.
        ([m("hi", H), m("lo", L)], [Waiter(1, "lo")], 1, [1]),
        # Both wait: high first, and low only if a slot is left after it.
        ([m("hi", H, queued=1), m("lo", L)], [Waiter(2, "lo"), Waiter(1, "hi")], 1, [1]),
        ([m("hi", H, queued=1), m("lo", L)], [Waiter(2, "lo"), Waiter(1, "hi")], 2, [1, 2]),
        # A runtime on every core (its own thread pool) leaves no slot for a lower priority one.
        ([m("hi", H, 2, queued=1), m("lo", L)], [Waiter(1, "lo")], 2, []),
        # Three priorities: normal counts high's demand and running normals, not the low batch.
        (
            [m("hi", H, queued=1), m("no", N, instances=2), m("lo", L, running=1)],
            [Waiter(1, "no"), Waiter(2, "no")],
            2,
            [1],
        ),
        # Within a priority, earliest deadline first; none overtakes one that waits.
        (
            [m("hi", H, running=1), m("a", L), m("b", L)],
            [Waiter(1, "a", 5.0), Waiter(2, "b", 3.0)],
            2,
            [2],
        ),
        # A tenant that left (draining) is let through.
        ([m("hi", H, running=1), m("lo", L)], [Waiter(1, "gone")], 1, [1]),
    ],
)
def test_admission_serves_higher_priority_first_and_keeps_its_slots(members, waiters, capacity, admitted):
    assert admit(waiters, members, capacity) == admitted


def g(key: str, priority: int, queued: int = 0, running: int = 0, recent: bool = False, weight: int = 1):
    """A tenant with a latency objective on the host CPU."""
    return Member(key, priority, weight, 1, 1, queued, running, objective=True, recent=recent)


@pytest.mark.parametrize(
    ("members", "waiters", "capacity", "admitted"),
    [
        # Two cores, one thread each: while the high tenant with an objective runs, the low batch
        # waits (a core is left to the agent's own work), though the other slot is free...
        ([g("hi", H, running=1), m("lo", L)], [Waiter(1, "lo")], 2, []),
        # ...also while it has frames queued, or finished a batch within its hold-off...
        ([g("hi", H, queued=2), m("lo", L)], [Waiter(1, "lo")], 2, []),
        ([g("hi", H, recent=True), m("lo", L)], [Waiter(1, "lo")], 2, []),
        # ...and runs in its idle gaps, once the hold-off is over.
        ([g("hi", H), m("lo", L)], [Waiter(1, "lo")], 2, [1]),
        # Without an objective the high tenant only keeps the slots it uses (as before).
        ([m("hi", H, running=1), m("lo", L)], [Waiter(1, "lo")], 2, [1]),
        # More cores: the low batch fits beside the high batch and the agent's core.
        ([g("hi", H, running=1), m("lo", L)], [Waiter(1, "lo")], 3, [1]),
        ([g("hi", H, recent=True), m("lo", L, 2)], [Waiter(1, "lo")], 4, [1]),
        ([g("hi", H, running=1), m("lo", L, 2)], [Waiter(1, "lo")], 3, []),
        # One core: no core to leave, but a recent high tenant still counts one batch as needed.
        ([g("hi", H, recent=True), m("lo", L)], [Waiter(1, "lo")], 1, []),
        ([g("hi", H), m("lo", L)], [Waiter(1, "lo")], 1, [1]),
        # A high tenant waiting at the gate itself is active: the low batch queued behind stays.
        ([g("hi", H), m("lo", L)], [Waiter(1, "hi"), Waiter(2, "lo")], 2, [1]),
        # The headroom is for higher priorities only: a normal tenant with an objective does not
        # hold back the high one (the highest never waits), and equal priorities do not either.
        ([m("hi", H), g("no", N, running=1)], [Waiter(1, "hi")], 2, [1]),
        ([g("a", L, running=1), m("b", L)], [Waiter(1, "b")], 2, [1]),
        # Three priorities: an active normal tenant with an objective keeps low back on two cores.
        ([m("hi", H), g("no", N, running=1), m("lo", L)], [Waiter(1, "lo")], 2, []),
    ],
)
def test_lower_batches_leave_headroom_for_an_active_objective_on_the_cpu(
    members, waiters, capacity, admitted
):
    assert admit(waiters, members, capacity) == admitted


def test_the_gate_holds_low_back_only_within_the_hold_off_after_a_high_batch(monkeypatch):
    """Two cores: while the high tenant (objective, one thread) runs, the low batch waits though a
    slot is free; after the high batch it is held back for that batch's time, then it runs."""
    clock = [100.0]
    monkeypatch.setattr(priority_gate.time, "monotonic", lambda: clock[0])
    gate = Gate("cpu", 2)
    high = TenantSpec(model="hi", backend="fake", threads=1, priority="high", latency_objective_ms=50)
    gate.join(1, high, lambda: 0)
    gate.join(2, TenantSpec(model="lo", backend="fake", threads=1, priority="low"), lambda: 0)
    assert gate.acquire(1, None, None)
    assert not gate.acquire(2, None, 0.0)
    clock[0] += 0.02  # the high batch takes 20 ms
    gate.release(1)
    clock[0] += 0.019
    assert not gate.acquire(2, None, 0.0)  # high idle for less than its batch time
    clock[0] += 0.002
    assert gate.acquire(2, None, 0.0)
    gate.release(2)


@pytest.mark.parametrize(
    ("threads", "resource", "weight_"),
    [(1, "cpu", 1), (None, "cpu", 2), (8, "cpu", 2), (None, "cuda:0", 1), (4, "cuda:0", 1)],
)
def test_a_batch_takes_a_slot_per_runtime_thread_on_the_cpu(threads, resource, weight_):
    spec = TenantSpec(model="m", backend="fake", threads=threads)
    assert weight(spec, resource, 2) == weight_


def test_gate_is_active_only_with_several_priorities():
    gate = Gate("cpu", 1)
    gate.join(1, TenantSpec(model="a", backend="fake"), lambda: 0)
    gate.join(2, TenantSpec(model="b", backend="fake"), lambda: 0)
    assert not gate.active
    assert gate.acquire(1, None, 0.0) and gate.acquire(2, None, 0.0)  # one slot, both run
    gate.join(3, TenantSpec(model="c", backend="fake", priority="low"), lambda: 0)
    assert gate.active
    assert not gate.acquire(3, None, 0.0)
    gate.release(1)
    gate.release(2)
    assert gate.acquire(3, None, 0.0)
    gate.leave(3)
    assert not gate.active


def test_frames_the_wait_makes_late_are_shed_and_the_rest_run():
    """The gate stays closed past the first frame's last useful start: that frame is shed (not
    run late); the one with time left keeps waiting and runs once a slot frees."""
    gate = Gate("cpu", 1)
    gate.join(1, TenantSpec(model="hi", backend="fake", priority="high"), lambda: 0)
    gate.join(2, TenantSpec(model="lo", backend="fake", priority="low"), lambda: 0)
    assert gate.acquire(1, None, None)
    now = time.monotonic()
    deadlines = {"late": now + 0.05, "fine": now + 60.0}
    shed: list[str] = []

    def on_shed(frame: str) -> None:
        shed.append(frame)
        gate.release(1)  # the high batch ends once the first frame gave up

    left = wait_for_slots(gate, 2, ["late", "fine"], deadlines.get, 0.01, on_shed)
    assert shed == ["late"] and left == ["fine"]
    gate.release(2)


# -- tenants on the fake runtime, one slot between them ------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return ModelRepository(MODELS).load("efficientnet-lite0")


class Sink:
    def __init__(self) -> None:
        self.done = threading.Condition()
        self.outcomes: list[InferResult | ErrorResult] = []

    def __call__(self, frame: Frame, outcome: InferResult | ErrorResult) -> None:
        with self.done:
            self.outcomes.append(outcome)
            self.done.notify_all()

    def wait(self, n: int, timeout: float = 60.0) -> bool:
        with self.done:
            return self.done.wait_for(lambda: len(self.outcomes) >= n, timeout=timeout)


def tenant(lite0, board: GateBoard, sink: Sink, **spec) -> Tenant:
    t = Tenant(
        TenantSpec(model="efficientnet-lite0", backend="fake", threads=1, **spec),
        lite0,
        FakeBackend(),
        sink,
        queue_depth=64,
        overload_policy="drop_oldest",
        max_pixels=40_000_000,
        gates=board,
    )
    t.load()
    return t


def frames(prefix: str, n: int) -> list[Frame]:
    image, now = sample("cat.jpg"), time.monotonic()
    return [Frame(f"{prefix}{i}", "efficientnet-lite0", image, received=now) for i in range(n)]


def test_low_priority_waits_for_the_high_tenant_and_is_shed_not_late(lite0):
    """One slot: the high tenant's call hangs with more of its frames queued. The low tenant's
    frames, which its own runtime could serve at once, wait and are answered `shed` at their
    objective; once the high call returns, every high frame is served."""
    board = GateBoard(cores=1)
    high_sink, low_sink = Sink(), Sink()
    high = tenant(lite0, board, high_sink, priority="high")
    low = tenant(lite0, board, low_sink, priority="low", latency_objective_ms=200)
    release = threading.Event()
    high.backend.sessions[0].gate = release  # type: ignore[attr-defined]
    high.start()
    low.start()
    try:
        high.submit_many(frames("h", 2))
        low.submit_many(frames("l", 3))
        assert low_sink.wait(3)
        release.set()
        assert high_sink.wait(2)
    finally:
        release.set()
        high.drain(5.0)
        low.drain(5.0)
    assert {o.error.code for o in low_sink.outcomes if isinstance(o, ErrorResult)} == {"shed"}
    assert len(low_sink.outcomes) == 3
    assert sorted(o.request_id for o in high_sink.outcomes if isinstance(o, InferResult)) == ["h0", "h1"]


def test_high_priority_runs_beside_a_low_batch_it_cannot_stop(lite0):
    """One slot, held by a low priority call that hangs: the high tenant's frames are still served."""
    board = GateBoard(cores=1)
    high_sink, low_sink = Sink(), Sink()
    high = tenant(lite0, board, high_sink, priority="high")
    low = tenant(lite0, board, low_sink, priority="low")
    release = threading.Event()
    low.backend.sessions[0].gate = release  # type: ignore[attr-defined]
    high.start()
    low.start()
    try:
        low.submit_many(frames("l", 1))
        high.submit_many(frames("h", 3))
        served = high_sink.wait(3, timeout=30.0)
        waiting = len(low_sink.outcomes)
        release.set()
        assert low_sink.wait(1)
    finally:
        release.set()
        high.drain(5.0)
        low.drain(5.0)
    assert served and waiting == 0
    assert all(isinstance(o, InferResult) for o in high_sink.outcomes + low_sink.outcomes)


@pytest.mark.parametrize(
    ("priority", "resource", "nice"), [("low", "cpu", 10), ("normal", "cpu", 0), ("low", "cuda:0", 0)]
)
def test_low_priority_threads_yield_the_host_cores(priority, resource, nice):
    """A low priority tenant's worker thread on the host CPU runs at a lower OS priority."""
    import os

    seen: list[int] = []
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def worker() -> None:
        yield_cores(Gate(resource, 2), TenantSpec(model="m", backend="fake", priority=priority))
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) - base)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [min(19, base + nice) - base]


def test_a_draining_tenant_is_let_through_the_gate(lite0):
    """A low priority frame without an objective waits at the gate behind a hung high priority call;
    when its tenant drains, the gate lets it through: it is served, not left unanswered."""
    board = GateBoard(cores=1)
    high_sink, low_sink = Sink(), Sink()
    high = tenant(lite0, board, high_sink, priority="high")
    low = tenant(lite0, board, low_sink, priority="low")
    release = threading.Event()
    high.backend.sessions[0].gate = release  # type: ignore[attr-defined]
    high.start()
    low.start()
    try:
        high.submit_many(frames("h", 2))
        low.submit_many(frames("l", 1))
        low.drain(1.0)
        answered = low_sink.wait(1, timeout=10.0)
    finally:
        release.set()
        high.drain(5.0)
    assert answered and [type(o) for o in low_sink.outcomes] == [InferResult]


def test_a_low_batch_leaves_a_core_to_a_busy_high_tenant_with_an_objective(lite0):
    """Two cores, one thread per tenant: a low frame would fit on the free core beside the high
    tenant's hung call, yet it waits at the gate (the core is left to the agent); once the high
    call returns and its short hold-off passes, the low frame is served."""
    board = GateBoard(cores=2)
    high_sink, low_sink = Sink(), Sink()
    high = tenant(lite0, board, high_sink, priority="high", latency_objective_ms=200)
    low = tenant(lite0, board, low_sink, priority="low")
    release = threading.Event()
    high.backend.sessions[0].gate = release  # type: ignore[attr-defined]
    high.start()
    low.start()
    gate = high.gate
    assert gate is not None
    try:
        high.submit_many(frames("h", 1))
        low.submit_many(frames("l", 1))
        waited = False
        for _ in range(1000):  # until the low batch is at the gate (an event, polled)
            with gate._cond:
                waited = any(member == id(low) for _, member in gate._waiters)
            if waited or low_sink.outcomes:
                break
            time.sleep(0.01)
        answered_early = len(low_sink.outcomes)
        release.set()
        assert low_sink.wait(1) and high_sink.wait(1)
    finally:
        release.set()
        high.drain(5.0)
        low.drain(5.0)
    assert waited and answered_early == 0
    assert all(isinstance(o, InferResult) for o in high_sink.outcomes + low_sink.outcomes)

"""Scheduler and tenant behaviour with the fake backend (a test double with a controllable delay)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

import pytest

from agent.frames.ingest import Frame
from agent.frames.scheduler import BatchQueue, QueueClosed, QueueFull, warmup_batch_sizes
from agent.frames.tenant import Tenant
from agent.protocol.schemas import BatchSpec, ErrorResult, InferResult, TenantSpec
from agent.service.model_repo import ModelRepository
from backends.base import BackendError
from backends.fake import FakeBackend
from tests.conftest import MODELS, sample


def test_batch_waits_at_most_max_delay_for_more_frames():
    q: BatchQueue[int] = BatchQueue(100)
    q.put(1)
    started = time.monotonic()
    batch = q.get_batch(max_size=8, max_delay_s=0.05)
    assert batch == [1]
    assert time.monotonic() - started >= 0.049  # it did wait for company


def test_batch_collects_frames_arriving_within_the_delay():
    q: BatchQueue[int] = BatchQueue(100)
    q.put(0)

    def feed() -> None:
        for i in range(1, 4):
            time.sleep(0.01)  # pacing: frames trickle in, well within the 2 s delay
            q.put(i)

    threading.Thread(target=feed).start()
    batch = q.get_batch(max_size=4, max_delay_s=2.0)
    assert batch == [0, 1, 2, 3]  # full before the (long) delay ran out


def test_batch_never_exceeds_max_size_and_keeps_order():
    q: BatchQueue[int] = BatchQueue(100)
    for i in range(20):
        q.put(i)
    assert q.get_batch(8, 0.0) == list(range(8))
    assert q.get_batch(8, 0.0) == list(range(8, 16))
    assert q.get_batch(8, 0.0) == list(range(16, 20))


def test_drop_oldest_returns_the_dropped_frame():
    q: BatchQueue[int] = BatchQueue(3, "drop_oldest")
    dropped = [q.put(i) for i in range(5)]
    assert dropped == [None, None, None, 0, 1]
    assert q.get_batch(10, 0.0) == [2, 3, 4]


def test_reject_new_refuses_when_full():
    q: BatchQueue[int] = BatchQueue(2, "reject_new")
    q.put(1)
    q.put(2)
    with pytest.raises(QueueFull):
        q.put(3)


def test_closed_queue_refuses_and_reports_end():
    q: BatchQueue[int] = BatchQueue(2)
    q.put(1)
    q.close()
    with pytest.raises(QueueClosed):
        q.put(2)
    assert q.get_batch(4, 0.0) == [1]
    assert q.get_batch(4, 0.0) is None


@pytest.fixture(scope="module")
def lite0():
    return ModelRepository(MODELS).load("efficientnet-lite0")


class Sink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: list[tuple[str, InferResult | ErrorResult]] = []

    def __call__(self, frame: Frame, outcome: InferResult | ErrorResult) -> None:
        with self.lock:
            self.outcomes.append((frame.request_id, outcome))

    def wait(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < n and time.monotonic() < deadline:
            time.sleep(0.01)


def make_tenant(
    lite0,
    sink,
    *,
    instances=1,
    max_size=1,
    delay_ms=0.0,
    depth=64,
    policy="drop_oldest",
    per_item_ms=0.0,
    **options,
):
    spec = TenantSpec(
        model="efficientnet-lite0",
        backend="fake",
        device="cpu",
        instances=instances,
        batch=BatchSpec(max_size=max_size, max_delay_ms=delay_ms),
    )
    tenant = Tenant(
        spec,
        lite0,
        FakeBackend(),
        sink,
        queue_depth=depth,
        overload_policy=policy,
        max_pixels=40_000_000,
        backend_options={"per_item_ms": per_item_ms, **options},
    )
    tenant.load()
    tenant.start()
    return tenant


def frame(i: int, image: bytes | None = None) -> Frame:
    return Frame(
        request_id=f"r{i}",
        model="efficientnet-lite0",
        image=image or sample("cat.jpg"),
        received=time.monotonic(),
    )


def test_every_frame_answered_exactly_once_under_overload(lite0):
    sink = Sink()
    tenant = make_tenant(lite0, sink, instances=2, depth=8, per_item_ms=5.0)
    for i in range(300):
        tenant.submit(frame(i))
    sink.wait(300)
    tenant.drain(5.0)
    ids = Counter(rid for rid, _ in sink.outcomes)
    assert len(ids) == 300 and set(ids.values()) == {1}
    errors = [o for _, o in sink.outcomes if isinstance(o, ErrorResult)]
    assert errors, "the overload policy dropped frames"
    assert {e.error.code for e in errors} == {"overloaded"}
    assert tenant.stats.drops == len(errors)


def test_reject_new_policy_answers_the_refused_frame(lite0):
    sink = Sink()
    tenant = make_tenant(lite0, sink, depth=2, policy="reject_new", per_item_ms=20.0)
    for i in range(20):
        tenant.submit(frame(i))
    sink.wait(20)
    tenant.drain(5.0)
    codes = Counter(o.error.code if isinstance(o, ErrorResult) else "ok" for _, o in sink.outcomes)
    assert codes["ok"] >= 2 and codes["overloaded"] >= 1 and sum(codes.values()) == 20
    refused = [rid for rid, o in sink.outcomes if isinstance(o, ErrorResult)]
    assert "r0" not in refused, "the oldest is kept under reject_new"


def test_dynamic_batching_forms_batches(lite0):
    sink = Sink()
    tenant = make_tenant(lite0, sink, max_size=8, delay_ms=50.0, per_item_ms=1.0)
    for i in range(32):
        tenant.submit(frame(i))
    sink.wait(32)
    tenant.drain(5.0)
    sizes = [o.batch_size for _, o in sink.outcomes if isinstance(o, InferResult)]
    assert len(sizes) == 32 and max(sizes) == 8
    assert tenant.stats.snapshot(60).batch_size_mean > 1


def test_bad_frame_in_a_batch_does_not_spoil_the_others(lite0):
    sink = Sink()
    tenant = make_tenant(lite0, sink, max_size=4, delay_ms=100.0)
    tenant.submit(frame(0))
    tenant.submit(frame(1, b"\xff\xd8\xff garbage"))
    tenant.submit(frame(2))
    sink.wait(3)
    tenant.drain(5.0)
    by_id = dict(sink.outcomes)
    assert isinstance(by_id["r0"], InferResult) and isinstance(by_id["r2"], InferResult)
    assert by_id["r1"].error.code == "bad_image"


def test_expired_frames_are_answered_expired(lite0):
    sink = Sink()
    tenant = make_tenant(lite0, sink)
    old = frame(0)
    old.expires_at = time.monotonic() - 1.0
    tenant.submit(old)
    sink.wait(1)
    tenant.drain(5.0)
    assert sink.outcomes[0][1].error.code == "expired"


def test_drain_answers_every_queued_frame(lite0):
    sink = Sink()
    tenant = make_tenant(lite0, sink, depth=100, per_item_ms=30.0)
    for i in range(50):
        tenant.submit(frame(i))
    tenant.drain(timeout_s=0.1)
    assert len(sink.outcomes) == 50
    codes = Counter(o.error.code if isinstance(o, ErrorResult) else "ok" for _, o in sink.outcomes)
    assert codes["shutting_down"] > 0 and codes["ok"] > 0
    tenant.submit(frame(99))  # after drain: refused, still answered
    assert sink.outcomes[-1][1].error.code == "unavailable"


def test_instances_run_in_parallel(lite0):
    sink = Sink()
    tenant = make_tenant(lite0, sink, instances=4, per_item_ms=50.0)
    for i in range(8):
        tenant.submit(frame(i))
    sink.wait(8)
    tenant.drain(5.0)
    used = {o.tenant.instance for _, o in sink.outcomes if isinstance(o, InferResult)}
    assert used == {0, 1, 2, 3}


def test_load_failure_marks_tenant_failed(lite0):
    spec = TenantSpec(model="efficientnet-lite0", backend="fake", device="cpu")
    tenant = Tenant(
        spec,
        lite0,
        FakeBackend(),
        Sink(),
        queue_depth=4,
        overload_policy="drop_oldest",
        max_pixels=1000,
        backend_options={"fail_load": "no such accelerator"},
    )
    with pytest.raises(BackendError):
        tenant.load()
    assert tenant.state == "failed" and "no such accelerator" in (tenant.error or "")


def test_unknown_device_fails_load(lite0):
    spec = TenantSpec(model="efficientnet-lite0", backend="fake", device="tpu:7")
    tenant = Tenant(
        spec, lite0, FakeBackend(), Sink(), queue_depth=4, overload_policy="drop_oldest", max_pixels=1000
    )
    with pytest.raises(BackendError, match="no device"):
        tenant.load()


def test_warmup_covers_the_batch_sizes_dynamic_batching_makes():
    assert warmup_batch_sizes(1) == [1]
    assert warmup_batch_sizes(8) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert warmup_batch_sizes(64) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64]
    assert warmup_batch_sizes(100) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, 100]


# -- a runtime call that never returns (hung accelerator) ------------------------------------------
def hang(tenant: Tenant, instance: int) -> threading.Event:
    """Make that instance's next runtime call block until the returned Event is set."""
    gate = threading.Event()
    tenant.backend.sessions[instance].gate = gate  # type: ignore[attr-defined]
    return gate


class Watchdog:
    """Calls check_stalls as the agent's once-a-second loop does, 20 times faster."""

    def __init__(self, tenant: Tenant, timeout_s: float) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(tenant, timeout_s), daemon=True)
        self.thread.start()

    def _run(self, tenant: Tenant, timeout_s: float) -> None:
        while not self.stop.wait(0.05):
            tenant.check_stalls(timeout_s)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def codes_of(sink: Sink) -> dict[str, str]:
    return {rid: (o.error.code if isinstance(o, ErrorResult) else "ok") for rid, o in sink.outcomes}


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@contextlib.contextmanager
def hung_tenant(lite0, sink: Sink, instances: int, per_item_ms: float):
    """A tenant whose instance 0 hangs in its next runtime call, watched with a 0.3 s timeout."""
    tenant = make_tenant(lite0, sink, instances=instances, per_item_ms=per_item_ms)
    gate = hang(tenant, 0)
    watchdog = Watchdog(tenant, 0.3)
    try:
        yield tenant, gate
    finally:
        gate.set()
        watchdog.close()
        tenant.drain(5.0)


def test_a_hung_instance_is_answered_and_the_others_keep_serving(lite0):
    sink = Sink()
    with hung_tenant(lite0, sink, instances=2, per_item_ms=20.0) as (tenant, gate):
        for i in range(20):
            tenant.submit(frame(i))
        sink.wait(20)
        codes = codes_of(sink)
        stuck = [rid for rid, code in codes.items() if code == "internal"]
        assert len(stuck) == 1, codes  # the one frame instance 0 took into its hung call
        message = dict(sink.outcomes)[stuck[0]].error.message
        assert "did not return within 0.3 s" in message and "instance 0" in message
        assert Counter(codes.values())["ok"] == 19
        assert {o.tenant.instance for _, o in sink.outcomes if isinstance(o, InferResult)} == {1}
        assert tenant.state == "ready" and "stuck" in (tenant.error or "")
        assert tenant.stats.stalls == 1

        gate.set()  # the call returns: its late result is dropped, the instance serves again
        assert wait_until(lambda: tenant.error is None), tenant.error
        for i in range(20, 28):
            tenant.submit(frame(i))
        sink.wait(28)
        tenant.drain(5.0)  # its workers have ended: no answer can come after this
        ids = Counter(rid for rid, _ in sink.outcomes)
        assert len(ids) == 28 and set(ids.values()) == {1}, "every frame answered exactly once"
        late = [o for rid, o in sink.outcomes if rid not in codes]
        assert {o.tenant.instance for o in late if isinstance(o, InferResult)} == {0, 1}


def test_with_every_instance_hung_frames_get_unavailable_until_one_returns(lite0):
    sink = Sink()
    with hung_tenant(lite0, sink, instances=1, per_item_ms=1.0) as (tenant, gate):
        for i in range(5):
            tenant.submit(frame(i))
        sink.wait(5)
        assert codes_of(sink) == {
            "r0": "internal",
            "r1": "unavailable",
            "r2": "unavailable",
            "r3": "unavailable",
            "r4": "unavailable",
        }
        assert tenant.state == "failed" and "stuck in inference" in (tenant.error or "")
        tenant.submit(frame(5))  # refused at once, not queued behind a call that may never return
        assert codes_of(sink)["r5"] == "unavailable"

        gate.set()
        assert wait_until(lambda: tenant.state == "ready"), tenant.state
        tenant.submit(frame(6))
        sink.wait(7)
        assert codes_of(sink)["r6"] == "ok"
        assert sorted(Counter(rid for rid, _ in sink.outcomes).values()) == [1] * 7


def test_drain_answers_a_batch_whose_call_never_returns(lite0):
    sink = Sink()
    tenant = make_tenant(lite0, sink, instances=1, per_item_ms=1.0)
    gate = hang(tenant, 0)
    session = tenant.backend.sessions[0]  # type: ignore[attr-defined]
    for i in range(3):
        tenant.submit(frame(i))
    assert wait_until(lambda: len(tenant.queue) == 2)  # r0 is inside the hung call
    tenant.drain(timeout_s=0.1)
    assert codes_of(sink) == {"r0": "shutting_down", "r1": "shutting_down", "r2": "shutting_down"}
    assert "hung" in dict(sink.outcomes)["r0"].error.message
    assert not session.closed, "a session is not closed under a running call"
    calls = len(session.batches)  # the warm-up's, so far: the hung call has not returned
    gate.set()
    # The hung call returns; its worker then handles the late result and ends (the queue is closed).
    assert wait_until(lambda: not any(t.is_alive() for t in tenant._threads)), "the worker ended"
    assert len(session.batches) == calls + 1, "the hung call did return"
    assert len(sink.outcomes) == 3, "the late result is dropped"


def test_a_tenant_serves_again_when_one_of_its_hung_instances_returns(lite0):
    sink = Sink()
    tenant = make_tenant(lite0, sink, instances=2, per_item_ms=1.0)
    gates = [hang(tenant, 0), hang(tenant, 1)]
    watchdog = Watchdog(tenant, 0.3)
    try:
        for i in range(2):
            tenant.submit(frame(i))
        assert wait_until(lambda: tenant.state == "failed"), tenant.state
        gates[1].set()  # instance 1 returns, instance 0 stays stuck
        assert wait_until(lambda: tenant.state == "ready"), (tenant.state, tenant.error)
        assert "instance 0 of 2 stuck" in (tenant.error or "")
        tenant.submit(frame(2))
        sink.wait(3)
        assert codes_of(sink) == {"r0": "internal", "r1": "internal", "r2": "ok"}
        tenant.drain(0.1)
        assert tenant.state == "draining", "a draining tenant stays draining"
    finally:
        for gate in gates:
            gate.set()
        watchdog.close()

"""Scheduler and tenant behaviour with the fake backend (a test double with a controllable delay)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from agent.ingest import Frame
from agent.model_repo import ModelRepository
from agent.scheduler import BatchQueue, QueueClosed, QueueFull
from agent.schemas import BatchSpec, ErrorResult, InferResult, TenantSpec
from agent.tenant import Tenant, warmup_batch_sizes
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
            time.sleep(0.01)
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
    assert tenant.stats.snapshot(60)["batch_size_mean"] > 1


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

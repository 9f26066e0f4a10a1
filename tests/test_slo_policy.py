"""Scheduling for latency objectives (agent/frames/slo_policy.py, slo_threads.py): the pure rules as
tables, then a tenant on the fake runtime with controlled timings (docs/protocol.md "Latency objectives")."""

from __future__ import annotations

import threading
import time

import pytest

from agent.frames.health import DriftWatch
from agent.frames.ingest import Frame
from agent.frames.slo_policy import PRIORITIES, Item, LatencyTable, plan
from agent.frames.slo_threads import thread_budget
from agent.frames.tenant import FailoverSettings, Tenant
from agent.placement.auto import choose, goodput
from agent.protocol.schemas import ErrorResult, InferResult, Placement, TenantSpec
from agent.service.model_repo import ModelRepository
from backends.fake import FakeBackend
from tests.conftest import MODELS, sample

H, N, L = PRIORITIES["high"], PRIORITIES["normal"], PRIORITIES["low"]


def table(ms: dict[int, float]):
    """A batch-time estimate from a fixed table (ms per batch size)."""
    return lambda size: ms.get(size)


def measured(ms: dict[int, float]):
    """The estimate of a latency table that measured these batch sizes."""
    t = LatencyTable()
    for size, value in ms.items():
        t.update(size, value)
    return t.estimate


LINEAR_10 = table({n: 10.0 * n for n in range(1, 17)})  # 10 ms per frame, no batching gain
BATCHY = table({1: 10.0, 2: 12.0, 3: 14.0, 4: 16.0, 8: 24.0})  # batching pays


@pytest.mark.parametrize(
    ("deadlines_ms", "max_size", "estimate", "take"),
    [
        # Room for the whole batch: every frame in one call.
        ([100, 100, 100, 100], 4, BATCHY, 4),
        # The head frame has 15 ms left: a batch of 3 (14 ms) fits it, a batch of 4 (16 ms) would not.
        ([15, 100, 100, 100], 4, BATCHY, 3),
        # The tightest frame goes first (earliest deadline) and bounds the whole batch.
        ([100, 100, 13], 3, BATCHY, 2),
        # Nothing measured yet: the largest batch.
        ([5, 5, 5], 8, table({}), 3),
        # Sizes not in the table are estimated from the nearest measured one.
        ([100] * 6, 6, measured({1: 10.0, 4: 16.0}), 6),
        ([23] * 6, 6, measured({1: 10.0, 4: 16.0}), 5),  # 4 ms per frame at 4: 5 -> 20 ms, 6 -> 24 ms
        # No objective on these frames: never limited.
        ([None, None], 2, LINEAR_10, 2),
    ],
)
def test_batch_is_the_largest_that_fits_the_tightest_deadline(deadlines_ms, max_size, estimate, take):
    items = [Item(0.0, None if d is None else d / 1000.0, N) for d in deadlines_ms]
    decision = plan(items, 0.0, max_size, estimate)
    assert len(decision.take) == take
    assert decision.shed == []


@pytest.mark.parametrize(
    ("items", "order"),
    [
        # Earliest deadline first, whatever the arrival order.
        ([Item(0.0, 0.30), Item(0.1, 0.20), Item(0.2, 0.25)], [1, 2, 0]),
        # Priority before deadline.
        ([Item(0.0, 0.10, L), Item(0.0, 0.50, H), Item(0.0, 0.20, N)], [1, 2, 0]),
        # Equal deadlines: arrival order.
        ([Item(0.2, 0.5), Item(0.1, 0.5), Item(0.3, 0.5)], [1, 0, 2]),
        # A frame without an objective goes after those with one, within its priority.
        ([Item(0.0, None), Item(0.1, 0.9)], [1, 0]),
    ],
)
def test_order_is_priority_then_earliest_deadline(items, order):
    assert plan(items, 0.0, 8, table({})).take == order


def test_a_frame_that_cannot_meet_its_objective_even_alone_is_shed_now():
    items = [Item(0.0, 0.005, H), Item(0.0, 0.050, H), Item(0.0, 0.004, N)]
    decision = plan(items, 0.0, 8, LINEAR_10)
    assert sorted(decision.shed) == [0, 2]  # 10 ms alone > 5 ms and 4 ms left
    assert decision.take == [1]


@pytest.mark.parametrize(
    ("priority", "shed"),
    [
        # 10 frames, 40 ms each, one at a time, one instance: frame k finishes at (k+1) * 40 ms.
        (H, 0),  # high priority: shed only when it could not make it alone (each could)
        (N, 7),  # normal: those the backlog ahead leaves no time for (k * 40 + 40 > 120 ms: k >= 3)
        (L, 8),  # low: the same with a margin (1.5 * (k * 40 + 40) > 120 ms: k >= 2)
    ],
)
def test_backlog_sheds_normal_and_low_priority_predictively(priority, shed):
    items = [Item(0.0, 0.120, priority) for _ in range(10)]
    decision = plan(items, 0.0, 1, table({1: 40.0}))
    assert len(decision.shed) == shed
    assert len(decision.take) == 1 and decision.take[0] not in decision.shed


def test_under_overload_low_priority_is_shed_before_high():
    # One queue, high and low priority frames with the same objective; room for about 3 frames.
    items = [Item(0.0, 0.120, L if i % 2 else H) for i in range(8)]
    decision = plan(items, 0.0, 1, table({1: 40.0}))
    shed_priorities = {items[i].priority for i in decision.shed}
    assert shed_priorities == {L}  # every low priority frame goes before any high priority one
    assert len(decision.shed) == 4


def test_more_instances_drain_the_backlog_faster():
    items = [Item(0.0, 0.120, N) for _ in range(10)]
    one = plan(items, 0.0, 1, table({1: 40.0}), servers=1)
    two = plan(items, 0.0, 1, table({1: 40.0}), servers=2)
    assert len(two.shed) < len(one.shed)


def test_explore_runs_one_frame_an_estimate_stuck_high_would_shed():
    """One slow batch (a first call, a burst of other work) must not shed every frame from then on:
    after a while without serving, the first frame still before its deadline runs, to measure again."""
    items = [Item(0.0, 0.100), Item(0.0, 0.100), Item(-1.0, -0.9)]
    stuck = table({1: 500.0})
    assert plan(items, 0.0, 1, stuck).take == []
    decision = plan(items, 0.0, 1, stuck, explore=True)
    assert decision.take == [0]
    assert sorted(decision.shed) == [1, 2]  # the rest shed; a frame past its deadline is never run


def test_latency_table_follows_measurements_per_batch_size():
    t = LatencyTable(window=4)
    assert t.estimate(4) is None
    t.update(1, 10.0)
    for ms in (20.0, 22.0, 200.0):  # one slow batch does not move the figure much
        t.update(4, ms)
    assert t.estimate(4) == 22.0
    assert t.estimate(1) == 10.0
    assert t.estimate(8) == 44.0  # from size 4's per-frame time
    assert t.per_frame(4) == 5.5
    for ms in (40.0, 40.0, 40.0):  # a device that slowed down: followed within a few batches
        t.update(4, ms)
    assert t.estimate(4) == 40.0
    t.update(2, float("nan"))  # ignored
    assert 2 not in t.measured()
    t.update(4, 10.0)  # under half the figure: outliers before, or the device recovered
    assert t.estimate(4) == 10.0


def spec(model: str, backend: str = "openvino", device: str = "CPU", **extra) -> TenantSpec:
    return TenantSpec(model=model, backend=backend, device=device, **extra)


def on_cpu(backend: str, device: str) -> str:
    return "cpu" if device.lower() == "cpu" else f"{backend}:{device.lower()}"


@pytest.mark.parametrize(
    ("tenants", "cores", "budget"),
    [
        # Alone on the CPU: the backend's own default.
        ([spec("a")], 2, {}),
        # Two models on 2 cores: one thread each (OpenVINO would take both cores for each).
        ([spec("a"), spec("b", backend="onnxruntime", device="cpu")], 2, {"a": 1, "b": 1}),
        # 8 cores, 2 + 1 instances: 2 threads each, the 2 spare cores to the high priority tenant.
        ([spec("a", instances=2), spec("b", priority="high")], 8, {"a": 2, "b": 4}),
        # An explicit setting is kept and its threads taken off first.
        ([spec("a", threads=3), spec("b"), spec("c")], 8, {"b": 3, "c": 2}),
        # More instances than cores: still one thread each (never none).
        ([spec("a", instances=3), spec("b")], 2, {"a": 1, "b": 1}),
        # A tenant on an accelerator does not share the CPU's cores.
        ([spec("a"), spec("b", device="GPU")], 4, {}),
    ],
)
def test_thread_budget_shares_the_cores(tenants, cores, budget):
    assert thread_budget(tenants, cores, on_cpu) == budget


def test_thread_budget_counts_two_versions_side_by_side_as_two_tenants():
    placed = Placement(tenants=[spec("a", version="1.0.0"), spec("a", version="2.0.0", priority="high")])
    assert thread_budget(placed.tenants, 5, on_cpu) == {"a@2.0.0": 3, "a@1.0.0": 2}


def test_thread_budget_never_exceeds_the_cores_when_it_can():
    tenants = [spec("a", instances=2), spec("b"), spec("c", priority="low")]
    budget = thread_budget(tenants, 8, on_cpu)
    assert sum(budget[t.model] * t.instances for t in tenants) == 8


def test_openvino_tenants_keep_their_own_pools_and_the_others_share_the_cores():
    """OpenVINO declares `thread_budget=False` (two models with a thread each did worse than taking
    turns); ONNX Runtime tenants beside them still get their share, and with a latency objective
    on the CPU every tenant does."""
    from agent.placement.auto import takes_thread_budget

    ov = [spec("a"), spec("b")]
    ort = [spec("c", backend="onnxruntime", device="cpu"), spec("d", backend="onnxruntime", device="cpu")]
    assert thread_budget(ov, 2, on_cpu, takes_thread_budget) == {}
    assert thread_budget(ov + ort, 4, on_cpu, takes_thread_budget) == {"c": 2, "d": 2}
    assert thread_budget(ov + ort, 4, on_cpu) == {"a": 1, "b": 1, "c": 1, "d": 1}  # without the opt-out
    # With a latency objective on the CPU, isolation wins: OpenVINO's tenants get their share too.
    timed = [spec("a", latency_objective_ms=50), spec("b")]
    assert thread_budget(timed, 2, on_cpu, takes_thread_budget) == {"a": 1, "b": 1}


def test_objective_must_leave_room_beyond_the_batch_delay():
    with pytest.raises(ValueError, match="max_delay_ms"):
        TenantSpec(model="m", latency_objective_ms=20, batch={"max_size": 4, "max_delay_ms": 20})
    with pytest.raises(ValueError):
        TenantSpec(model="m", priority="urgent")
    assert TenantSpec(model="m", latency_objective_ms=50, priority="high").priority == "high"


def test_automatic_placement_counts_only_answers_within_the_objective():
    """Throughput-first puts `a` on the CPU (60 + 100 img/s beats 100 + 10), where a frame takes
    16.7 ms: over its 15 ms objective, so none of those answers count. Within objectives, `a` takes
    the GPU and `b` (no objective) the CPU."""
    a = {("torch", "cuda:0"): 100.0, ("openvino", "CPU"): 60.0}
    b = {("torch", "cuda:0"): 100.0, ("openvino", "CPU"): 10.0}
    assert choose({"a": a, "b": b}) == {"a": ("openvino", "CPU"), "b": ("torch", "cuda:0")}
    assert choose({"a": a, "b": b}, objectives={"a": (1, 15.0), "b": (1, None)}) == {
        "a": ("torch", "cuda:0"),
        "b": ("openvino", "CPU"),
    }
    assert goodput(60.0, 1, 15.0) == 0.0 and goodput(60.0, 1, 20.0) == 60.0


# -- a tenant on the fake runtime -----------------------------------------------------------------


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

    def wait(self, n: int) -> None:
        with self.done:
            self.done.wait_for(lambda: len(self.outcomes) >= n, timeout=60)


def test_tenant_sheds_what_cannot_meet_its_objective_and_counts_it(lite0):
    """The runtime takes 200 ms a frame and the objective is 300 ms: of 8 frames queued together
    the first is served, and every later one is answered `shed` at once (it would finish at 400 ms
    or later), not late. The counters say so, by reason."""
    sink = Sink()
    tenant = Tenant(
        TenantSpec(model="efficientnet-lite0", backend="fake", latency_objective_ms=300),
        lite0,
        FakeBackend(),
        sink,
        queue_depth=64,
        overload_policy="drop_oldest",
        max_pixels=40_000_000,
        backend_options={"delay_ms": 200.0},
    )
    tenant.load()
    tenant.start()
    try:
        image = sample("cat.jpg")
        now = time.monotonic()
        tenant.submit_many([Frame(f"r{i}", "efficientnet-lite0", image, received=now) for i in range(8)])
        sink.wait(8)
    finally:
        tenant.drain(5.0)
    served = [o for o in sink.outcomes if isinstance(o, InferResult)]
    shed = [o for o in sink.outcomes if isinstance(o, ErrorResult)]
    assert [o.request_id for o in served] == ["r0"]
    assert {o.error.code for o in shed} == {"shed"} and len(shed) == 7
    assert "300 ms objective" in shed[0].error.message
    counters = tenant.stats.counters()
    assert counters.shed == 7
    assert counters.within_objective + counters.missed_queueing + counters.missed_inference == 1
    snap = tenant.stats.snapshot(60.0)
    assert snap.objective_share is not None and snap.objective_share <= 1 / 8


def test_drift_check_compares_like_with_like_across_batch_sizes(lite0):
    """The drift baseline taken on batches of 4 (5 ms a frame) is what a batch of 1 costs (10 ms):
    a single frame at 12 ms is no drift, where a per-frame comparison would see 2.4x."""
    reported: list[str] = []
    tenant = Tenant(
        TenantSpec(model="efficientnet-lite0", backend="fake", batch={"max_size": 4}),
        lite0,
        FakeBackend(),
        Sink(),
        queue_depth=8,
        overload_policy="drop_oldest",
        max_pixels=40_000_000,
    )
    tenant.placed_as(
        tenant.spec,
        FailoverSettings(
            on_unhealthy=lambda _t, kind, why: reported.append(f"{kind}: {why}"),
            drift=DriftWatch(2.0, warmup=1, window=1),
        ),
    )
    tenant.latency.update(1, 10.0)
    tenant.latency.update(4, 20.0)
    tenant.batch_served(5.0, 4)  # the baseline: 10 ms at batch 1
    tenant.batch_served(12.0, 1)
    assert reported == []
    tenant.batch_served(25.0, 1)  # a real drift still shows
    assert reported and reported[0].startswith("drift")


# -- the real agent, two real models (slow) ---------------------------------------------------------

TWO_TENANTS = """
[metrics]
telemetry_interval_s = 1.0
[placement]
generation = 1
[[placement.tenants]]
model = "efficientnet-lite0"
priority = "high"
latency_objective_ms = 60000
[[placement.tenants]]
model = "mb3-centernet"
priority = "low"
latency_objective_ms = 1
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_real_tenants_objectives_shedding_and_thread_budget(agent_factory, collector):
    """A high priority classifier with an objective it can meet and a low priority detector with one
    it cannot (1 ms): every classifier frame is served within it, the detector's frames are answered
    `shed` at once once its batch time is measured (only its first frame runs), each frame once;
    telemetry counts both, and the two tenants on the CPU got a share of its cores each."""
    import os

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    agent = agent_factory("slo1", config=TWO_TENANTS).start()
    status = agent.wait_ready(120)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert {t["model"]: t["threads"] for t in status["placement"]["tenants"]} == {
        "efficientnet-lite0": share,
        "mb3-centernet": share,
    }
    c = collector(["edge/slo1/result", "edge/slo1/telemetry"])
    n = 30
    for i in range(n):
        for model, photo in (("efficientnet-lite0", "espresso.jpg"), ("mb3-centernet", "cat.jpg")):
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = f"{model}-{i}".encode()
            c.publish(f"edge/slo1/infer/{model}", sample(photo), properties=props)
    answers = c.wait_for(lambda r: len(r) >= 2 * n, "edge/slo1/result", timeout=180)
    assert sorted(a["request_id"] for a in answers) == sorted(
        f"{m}-{i}" for i in range(n) for m in ("efficientnet-lite0", "mb3-centernet")
    )
    classifier = [a for a in answers if a["model"] == "efficientnet-lite0"]
    detector = [a for a in answers if a["model"] == "mb3-centernet"]
    assert all("top" in a for a in classifier)
    shed = [a for a in detector if "error" in a]
    assert {a["error"]["code"] for a in shed} == {"shed"}
    assert len(shed) >= n - 1  # only its first frame ran, before its batch time was measured

    def counted(msgs: list[dict]) -> bool:
        tenants = {t["model"]: t for t in (msgs[-1]["tenants"] if msgs else [])}
        return tenants.get("efficientnet-lite0", {}).get("frames_out") == n and tenants.get(
            "mb3-centernet", {}
        ).get("shed") == len(shed)

    tel = {t["model"]: t for t in c.wait_for(counted, "edge/slo1/telemetry", timeout=30)[-1]["tenants"]}
    assert tel["efficientnet-lite0"]["within_objective"] == n
    det = tel["mb3-centernet"]
    assert det["within_objective"] == 0
    assert det["missed_queueing"] + det["missed_inference"] == det["frames_out"] == n - len(shed)

"""Fault injection, the relay of a failing tenant, health backoff and drift, candidates in a placement.

Without a broker; the tenant-level tests load the real bundled model on the real ONNX Runtime and
OpenVINO backends (faults are injected by the agent's own agent/frames/faults.py, as an operator would).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from agent.frames import faults
from agent.frames.faults import Fault, FaultSpecError, parse_fault
from agent.frames.health import DriftWatch, Health, Relay
from agent.frames.ingest import Frame
from agent.frames.tenant import FailoverSettings, Tenant
from agent.protocol.schemas import ErrorResult, InferResult, Placement, TenantSpec
from agent.service.model_repo import ModelRepository
from backends import registry
from backends.base import InferenceError
from tests.conftest import CAT_CLASSES, MODELS, sample


# -- specifications ---------------------------------------------------------------------------------
def test_fault_specs_parse_with_devices_that_hold_colons() -> None:
    fault = parse_fault("openvino:CPU:hang:after=200")
    assert (fault.backend, fault.device, fault.kind, fault.after, fault.count) == (
        "openvino",
        "CPU",
        "hang",
        200,
        None,
    )
    fault = parse_fault("tensorrt:cuda:0:error:after=5:once")
    assert (fault.device, fault.kind, fault.count) == ("cuda:0", "error", 1)
    assert parse_fault("onnxruntime:cpu:slow:ms=40:count=3").ms == 40.0
    assert (
        faults.FaultSet.parse(" openvino:CPU:hang , onnxruntime:cpu:error:after=1").find("OPENVINO", "cpu")
        is not None
    )


@pytest.mark.parametrize(
    "text",
    [
        "openvino:CPU",
        "openvino:CPU:explode",
        "openvino:CPU:hang:after=x",
        "a:b:slow:ms=-1",
        "a:b:error:count=0",
    ],
)
def test_a_bad_fault_spec_is_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(FaultSpecError, match="fault"):
        parse_fault(text)


def test_error_fault_fires_after_n_frames_for_count_calls_and_probes_meet_it_once_fired() -> None:
    fault = Fault("onnxruntime", "cpu", "error", after=3, count=2)
    fault.inject(0)  # a warm-up before any frame: not affected
    fault.inject(2)
    fault.inject(1)  # frames 1-3 served
    with pytest.raises(InferenceError, match="injected"):
        fault.inject(1)
    with pytest.raises(InferenceError):
        fault.inject(0)  # a probe once fired: affected, and it uses up the count
    fault.inject(1)  # count spent: the device serves again
    assert (fault.frames, fault.fired) == (5, 2)


def test_a_hang_blocks_the_call_until_released() -> None:
    fault = Fault("openvino", "CPU", "hang", after=0)
    returned = threading.Event()
    thread = threading.Thread(target=lambda: (fault.inject(1), returned.set()), daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and fault.fired == 1 and not returned.is_set()
    fault.release()
    thread.join(10)
    assert returned.is_set()


# -- the relay ----------------------------------------------------------------------------------------
def frame(i: int) -> Frame:
    return Frame(
        request_id=f"r{i}", model="efficientnet-lite0", image=sample("cat.jpg"), received=time.monotonic()
    )


class Sink:
    def __init__(self) -> None:
        self.got: list[str] = []

    def take_over(self, f: Frame) -> None:
        self.got.append(f.request_id)


def test_relay_holds_then_forwards_in_order_and_answers_overflow_and_failure() -> None:
    rejected: list[tuple[str, str]] = []
    relay = Relay(lambda f, code, _msg: rejected.append((f.request_id, code)), depth=3)
    relay.put([frame(i) for i in range(4)])
    assert relay.held == 3 and rejected == [("r0", "overloaded")]
    sink = Sink()
    relay.connect(sink)
    relay.put([frame(4)])
    assert sink.got == ["r1", "r2", "r3", "r4"] and relay.moved == 4
    lost = Relay(lambda f, code, _msg: rejected.append((f.request_id, code)), depth=8)
    lost.put([frame(5)])
    lost.fail("nothing else can serve it")
    lost.put([frame(6)])
    assert rejected[1:] == [("r5", "unavailable"), ("r6", "unavailable")]


# -- health and drift ---------------------------------------------------------------------------------
def test_backoff_doubles_per_failure_up_to_the_cap_and_a_probe_makes_it_healthy() -> None:
    health = Health("openvino:gpu")
    delays = []
    for _ in range(6):
        health.fail("stall", base_s=1.0, max_s=10.0, now=100.0)
        delays.append(health.retry_at - 100.0)
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert not health.due(105.0) and health.due(110.0)
    health.passed(now=111.0)
    assert health.healthy and health.since == 111.0 and not health.due(200.0)


def test_drift_is_latency_far_above_the_own_baseline() -> None:
    watch = DriftWatch(factor=4.0, warmup=10, window=5)
    assert all(watch.add(10.0) is None for _ in range(10))
    assert watch.baseline_ms == 10.0
    assert all(watch.add(20.0) is None for _ in range(5)), "twice the baseline is no drift"
    found = [watch.add(60.0) for _ in range(5)]
    assert found[-1] == 60.0


# -- candidates in a placement ------------------------------------------------------------------------
def test_candidates_set_backend_and_device_and_the_single_backend_form_is_unchanged() -> None:
    spec = TenantSpec.model_validate(
        {"model": "m", "candidates": [{"backend": "openvino", "device": "GPU"}, {"backend": "onnxruntime"}]}
    )
    assert (spec.backend, spec.device) == ("openvino", "GPU")
    assert [c.label for c in spec.candidate_list()] == ["openvino:GPU", "onnxruntime:cpu"]
    plain = TenantSpec(model="m", backend="tflite")
    assert plain.candidates is None and [c.label for c in plain.candidate_list()] == ["tflite:cpu"]
    assert "candidates" not in plain.model_dump(exclude_none=True)
    assert spec.key() != spec.on(spec.candidate_list()[1]).key(), "a move changes the running tenant's key"


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"backend": "tflite", "candidates": [{"backend": "openvino"}]}, "first candidate"),
        ({"candidates": [{"backend": "auto"}]}, "auto"),
        ({"candidates": [{"backend": "openvino"}, {"backend": "openvino", "device": "cpu"}]}, "twice"),
        ({"candidates": []}, "at least 1"),
    ],
)
def test_bad_candidates_are_refused(entry: dict, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        Placement.model_validate({"tenants": [{"model": "m", **entry}]})


# -- a real tenant fails over through its relay ---------------------------------------------------------
@pytest.fixture
def injected() -> Iterator[None]:
    yield
    faults.configure("")  # releases hung calls, nothing injected for the next test


def tenant_on(backend: str, device: str, answers: list[tuple[str, object]]) -> Tenant:
    ok, _devices, reason = registry.capabilities_of(backend)
    if not ok:
        pytest.skip(f"{backend} unavailable: {reason}")
    tenant = Tenant(
        TenantSpec(model="efficientnet-lite0", backend=backend, device=device),
        ModelRepository(MODELS).load("efficientnet-lite0"),
        registry.get(backend),
        lambda f, outcome: answers.append((f.request_id, outcome)),
        queue_depth=64,
        overload_policy="drop_oldest",
        max_pixels=40_000_000,
    )
    tenant.load()
    tenant.start()
    return tenant


def test_errors_in_a_row_hand_the_frames_to_the_next_candidate_each_answered_once(injected: None) -> None:
    faults.configure("openvino:CPU:error:after=2")
    answers: list[tuple[str, object]] = []
    first = tenant_on("openvino", "CPU", answers)
    second = tenant_on("onnxruntime", "cpu", answers)
    relays: list[Relay] = []

    def unhealthy(t: Tenant, kind: str, reason: str) -> Relay:
        assert kind == "error" and "2 runtime errors in a row" in reason
        relays.append(Relay(t.reject, 64))
        return relays[-1]

    first.placed_as(first.spec, FailoverSettings(unhealthy, errors_to_fail=2))
    try:
        for i in range(6):
            first.submit(frame(i))
        deadline = time.monotonic() + 60
        # r0, r1 served, r2 failed, r3 failed: moving; r3-r5 held while the next candidate loads
        while (not relays or relays[0].held < 3) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(answers) == 3 and relays[0].held == 3
        assert relays, "the second error in a row made the candidate unhealthy"
        relays[0].connect(second)  # what the reconciler does once the next candidate serves
        while len(answers) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        first.drain(1.0)
        second.drain(5.0)
    by_id = {rid: outcome for rid, outcome in answers}
    assert len(answers) == len(by_id) == 6, "every frame answered exactly once"
    assert [type(by_id[f"r{i}"]).__name__ for i in range(6)] == [
        "InferResult",
        "InferResult",
        "ErrorResult",
        "InferResult",
        "InferResult",
        "InferResult",
    ]
    assert first.stats.frames_in + second.stats.frames_in == 6, "a relayed frame is counted once"
    moved = [by_id[f"r{i}"] for i in range(3, 6)]
    assert all(isinstance(r, InferResult) and r.tenant.backend == "onnxruntime" for r in moved)
    assert all(r.top[0].index in CAT_CLASSES for r in moved if isinstance(r, InferResult))
    error = by_id["r2"]
    assert isinstance(error, ErrorResult) and "injected fault" in error.error.message


def test_an_edit_starts_from_the_placed_candidates_and_a_move_replaces_them() -> None:
    """The console and `edge-agent place` edit what runs: a failed-over tenant is its placement
    entry (candidates in order), and moving it names one place instead."""
    from agent.protocol.editing import current_tenants, move_tenants
    from agent.protocol.schemas import Capabilities, PlacementStatus, Status, TenantStatus

    placed = TenantSpec.model_validate(
        {
            "model": "efficientnet-lite0",
            "candidates": [{"backend": "openvino", "device": "CPU"}, {"backend": "onnxruntime"}],
        }
    )
    serving = TenantStatus(
        **placed.on(placed.candidate_list()[1]).model_dump(),
        state="ready",
        serving={"backend": "onnxruntime", "device": "cpu"},
    )
    status = Status(
        online=True, placement=PlacementStatus(generation=1, applied_generation=1, tenants=[serving])
    )
    [edit] = current_tenants(status, None)
    assert edit == placed and (edit.backend, edit.device) == ("openvino", "CPU")
    caps = Capabilities.model_validate(
        {"backends": {"tflite": {"available": True, "devices": ["cpu"]}}, "models": []}
    )
    moved = move_tenants(
        [edit],
        caps.model_copy(update={"models": ["efficientnet-lite0"]}),
        "efficientnet-lite0",
        "openvino",
        "tflite",
        None,
    )
    assert moved is not None and moved[0].candidates is None and moved[0].backend == "tflite"
    published = Placement.model_validate_json(
        Placement(tenants=moved).model_dump_json()
    )  # as the agent reads it
    assert published.tenants[0].key() == moved[0].key()


def test_a_slow_drift_is_reported_while_the_old_candidate_keeps_answering(injected: None) -> None:
    """Latency far above the tenant's own baseline (an injected `slow` fault on OpenVINO): the
    candidate is reported unhealthy as a drift, without a relay, so it serves until the next one is
    ready (make-before-break)."""
    faults.configure("openvino:CPU:slow:after=12:ms=150")
    answers: list[tuple[str, object]] = []
    tenant = tenant_on("openvino", "CPU", answers)
    reported: list[tuple[str, str]] = []
    tenant.placed_as(
        tenant.spec,
        FailoverSettings(
            lambda _t, kind, reason: reported.append((kind, reason)) or None,
            drift=DriftWatch(factor=4.0, warmup=10, window=3),
        ),
    )
    try:
        for i in range(16):
            tenant.submit(frame(i))
        deadline = time.monotonic() + 60
        while len(answers) < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        tenant.drain(5.0)
    assert [kind for kind, _ in reported] == ["drift"], reported
    assert "against a baseline of" in reported[0][1]
    assert len(answers) == 16 and all(isinstance(a, InferResult) for _, a in answers), (
        "all served, none moved"
    )
    assert not tenant.handing_off

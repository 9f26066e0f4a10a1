"""The failover policy as a table: which candidate next, when to fail back, what a move is called
(agent/placement/failover_policy.py), and the one key of an accelerator (agent/frames/health.py)."""

from __future__ import annotations

import pytest

from agent.frames.health import Health, HealthBook, device_key
from agent.placement import failover_policy as policy
from agent.protocol.schemas import Candidate
from agent.service.config import FailoverConfig

OV_GPU = Candidate(backend="openvino", device="GPU")
OV_GPU0 = Candidate(backend="openvino", device="GPU.0")
OV_CPU = Candidate(backend="openvino", device="CPU")
ORT = Candidate(backend="onnxruntime", device="cpu")
TRT = Candidate(backend="tensorrt", device="cuda:0")
CANDIDATES = [OV_GPU, ORT, TRT]
SETTINGS = FailoverConfig(failback_after_s=30.0, probe_interval_s=5.0, backoff_max_s=300.0)
NOW = 1000.0


def unhealthy(
    candidate: Candidate, failures: int = 1, since: float = NOW - 1, kind: str = "", retry_at: float = 0.0
) -> Health:
    return Health(
        policy.key(candidate),
        healthy=False,
        reason="stall: hung",
        since=since,
        failures=failures,
        retry_at=retry_at,
        kind=kind,
    )


def healthy(candidate: Candidate, since: float, failures: int = 0) -> Health:
    return Health(policy.key(candidate), healthy=True, since=since, failures=failures)


def book(*records: Health) -> dict[str, Health]:
    return {h.label: h for h in records}


# -- the key ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("openvino", "GPU"), ("openvino", "GPU.0")),
        (("openvino", "GPU"), ("OpenVINO", "gpu:0")),
        (("tensorrt", "cuda"), ("tensorrt", "cuda:0")),
        (("edgetpu", "usb"), ("edgetpu", "USB:0")),
        (("onnxruntime", "cpu"), ("onnxruntime", " CPU ")),
    ],
)
def test_one_accelerator_has_one_key_however_it_is_written(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert device_key(*a) == device_key(*b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("openvino", "GPU.0"), ("openvino", "GPU.1")),
        (("openvino", "GPU"), ("openvino", "CPU")),
        (("openvino", "cpu"), ("onnxruntime", "cpu")),
        (("edgetpu", "usb:0"), ("edgetpu", "pci:0")),
        (("openvino", "HETERO:GPU,CPU"), ("openvino", "GPU")),
    ],
)
def test_different_accelerators_have_different_keys(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert device_key(*a) != device_key(*b)


def test_health_recorded_under_gpu_is_the_health_of_gpu_0() -> None:
    health = HealthBook()
    health[OV_GPU].fail("stall: hung", 5.0, 300.0, now=NOW, kind="stall")
    assert not health[OV_GPU0].healthy and health[OV_GPU0] is health[OV_GPU]
    assert list(health.of([])) == [policy.key(OV_GPU0)]
    # ... so a tenant placed on GPU.0 does not start on a GPU another tenant found hung.
    assert policy.start_order([OV_GPU0, ORT], health.of([OV_GPU0, ORT])) == [ORT, OV_GPU0]


# -- where to start, where to go -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ((), [OV_GPU, ORT, TRT]),
        ((unhealthy(OV_GPU),), [ORT, TRT, OV_GPU]),
        ((unhealthy(OV_GPU), unhealthy(TRT)), [ORT, OV_GPU, TRT]),
        ((unhealthy(OV_GPU0),), [ORT, TRT, OV_GPU]),  # written GPU.0 elsewhere: the same GPU
    ],
)
def test_start_order_is_the_placed_order_healthy_ones_first(
    records: tuple[Health, ...], expected: list[Candidate]
) -> None:
    assert policy.start_order(CANDIDATES, book(*records)) == expected


@pytest.mark.parametrize(
    ("serving", "records", "stranded", "expected"),
    [
        (OV_GPU, (unhealthy(OV_GPU),), False, [ORT, TRT]),
        (OV_GPU, (unhealthy(OV_GPU), unhealthy(ORT)), False, [TRT]),
        (ORT, (unhealthy(OV_GPU),), False, [TRT]),  # a drift on ORT: never back to ORT itself
        (ORT, (), False, [OV_GPU, TRT]),
        (ORT, (), True, [OV_GPU, ORT, TRT]),  # stranded: its own candidate may take it back
        (OV_GPU, (unhealthy(OV_GPU), unhealthy(ORT), unhealthy(TRT)), True, []),
        (OV_GPU0, (), False, [ORT, TRT]),  # serving on GPU.0 is serving on GPU
    ],
)
def test_next_candidates(
    serving: Candidate, records: tuple[Health, ...], stranded: bool, expected: list[Candidate]
) -> None:
    assert policy.next_candidates(CANDIDATES, serving, book(*records), stranded) == expected


@pytest.mark.parametrize(
    ("source", "target", "kind"),
    [
        (OV_GPU, ORT, "failover"),
        (ORT, TRT, "failover"),
        (ORT, OV_GPU, "failback"),
        (TRT, ORT, "failback"),
        (TRT, OV_GPU0, "failback"),
        (OV_GPU, OV_GPU0, "failover"),  # a stranded tenant reloaded where it was
    ],
)
def test_move_kind_is_failback_only_towards_a_better_rank(
    source: Candidate, target: Candidate, kind: str
) -> None:
    assert policy.move_kind(CANDIDATES, source, target) == kind


# -- failback ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("failures", "healthy_for", "stranded", "due"),
    [
        (0, 29.0, False, False),
        (0, 30.0, False, True),
        (1, 30.0, False, True),
        (2, 59.0, False, False),  # the hold doubles per failure in a row, as the probe backoff does
        (2, 60.0, False, True),
        (10, 299.0, False, False),  # ... up to backoff_max_s
        (10, 300.0, False, True),
        (3, 0.0, True, True),  # stranded: any healthy candidate, at once
    ],
)
def test_failback_waits_for_the_hold(failures: int, healthy_for: float, stranded: bool, due: bool) -> None:
    health = healthy(OV_GPU, since=NOW - healthy_for, failures=failures)
    assert policy.failback_due(health, NOW, SETTINGS, stranded) is due
    assert policy.failback_hold_s(health, SETTINGS) == health.backoff(30.0, 300.0)


def test_an_unhealthy_candidate_is_never_due_for_failback() -> None:
    assert not policy.failback_due(unhealthy(OV_GPU, since=0.0), NOW, SETTINGS, stranded=True)


# -- the health check, one tenant at a time --------------------------------------------------------
def steps(decision: policy.Check) -> list[tuple[str, str]]:
    return [(s.action, s.candidate.label) for s in decision.steps]


@pytest.mark.parametrize(
    ("serving", "records", "stranded", "expected"),
    [
        # on the preferred candidate, all healthy: nothing to do
        (OV_GPU, (), False, []),
        # on the second: the first is probed when due, not before
        (ORT, (unhealthy(OV_GPU, retry_at=NOW + 1),), False, []),
        (ORT, (unhealthy(OV_GPU, retry_at=NOW),), False, [("probe", "openvino:GPU")]),
        # a probe already running is not started again
        (ORT, (Health(policy.key(OV_GPU), healthy=False, retry_at=0.0, probing=True),), False, []),
        # it passed, but not long enough ago
        (ORT, (healthy(OV_GPU, since=NOW - 10),), False, []),
        (ORT, (healthy(OV_GPU, since=NOW - 30),), False, [("move", "openvino:GPU")]),
        # on the third: the better ones in order; worse ones are not probed
        (
            TRT,
            (healthy(OV_GPU, since=NOW - 40), unhealthy(ORT)),
            False,
            [("move", "openvino:GPU"), ("probe", "onnxruntime:cpu")],
        ),
        (ORT, (unhealthy(TRT),), False, [("move", "openvino:GPU")]),  # never seen: healthy all along
        # stranded: every candidate, its own included, probed or taken at once
        (
            OV_GPU,
            (unhealthy(OV_GPU), healthy(ORT, since=NOW), unhealthy(TRT, retry_at=NOW + 5)),
            True,
            [("probe", "openvino:GPU"), ("move", "onnxruntime:cpu")],
        ),
    ],
)
def test_health_check_steps(
    serving: Candidate, records: tuple[Health, ...], stranded: bool, expected: list[tuple[str, str]]
) -> None:
    decision = policy.check(CANDIDATES, serving, stranded, False, book(*records), NOW, SETTINGS)
    assert decision.leave is None and steps(decision) == expected


def test_a_tenant_leaves_an_accelerator_another_tenant_found_hung() -> None:
    records = book(unhealthy(OV_GPU0, kind="stall"), unhealthy(ORT))
    decision = policy.check(CANDIDATES, OV_GPU, False, False, records, NOW, SETTINGS)
    assert decision.leave == [TRT] and decision.leave_reason == "openvino:GPU unhealthy (stall: hung)"
    assert not decision.steps


@pytest.mark.parametrize(
    ("kind", "stranded", "handing_off"),
    [
        ("", False, False),  # a failed load or a drift may be one model's alone: the others stay
        ("stall", True, False),  # stranded: probes and moves as usual
        ("stall", False, True),  # its own failover is under way
    ],
)
def test_a_tenant_stays_unless_its_accelerator_is_failing(
    kind: str, stranded: bool, handing_off: bool
) -> None:
    records = book(unhealthy(OV_GPU, kind=kind, retry_at=NOW + 60))
    decision = policy.check(CANDIDATES, OV_GPU, stranded, handing_off, records, NOW, SETTINGS)
    assert decision.leave is None


@pytest.mark.parametrize(
    ("serving", "failures", "since", "forget"),
    [
        (OV_GPU, 3, NOW - 301, True),  # serving steadily on the preferred one: backoff starts over
        (OV_GPU, 3, NOW - 299, False),
        (OV_GPU, 0, NOW - 301, False),
        (ORT, 3, NOW - 301, False),  # only the preferred candidate
    ],
)
def test_failures_are_forgotten_after_serving_steadily(
    serving: Candidate, failures: int, since: float, forget: bool
) -> None:
    records = book(healthy(serving, since=since, failures=failures))
    assert policy.check(CANDIDATES, serving, False, False, records, NOW, SETTINGS).forget_failures is forget

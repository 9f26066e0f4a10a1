"""The rollout planner (cloud_console/rollouts.py), pure: waves, gates, promotion, rollback, commands.

Table-driven unit tests, and scenarios driven by a small rig that plays devices: it publishes what the
planner asks (reporting back as the engine does) and reports status and telemetry the way agents do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError

from agent.protocol.delivery import InstalledModel, InstalledVersion
from agent.protocol.schemas import (
    Capabilities,
    DeviceTelemetry,
    Percentiles,
    PlacementStatus,
    Status,
    Telemetry,
    TenantSpec,
    TenantStatus,
    TenantTelemetry,
)
from cloud_console import rollouts as planner
from cloud_console.rollouts import Change, DeviceView, Figures, Gates, RolloutError, RolloutSpec
from cloud_console.selectors import SelectorError, merged_tags, parse

M = "efficientnet-lite0"


# -- selectors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("selector", "device_id", "tags", "expected"),
    [
        ("", "a", {}, True),
        ("*", "a", {"site": "north"}, True),
        ("site=north", "a", {"site": "north"}, True),
        ("site=north", "a", {"site": "south"}, False),
        ("site=north", "a", {}, False),
        ("site=north|south", "a", {"site": "south"}, True),
        ("site!=north", "a", {"site": "south"}, True),
        ("site!=north", "a", {}, True),
        ("site!=north", "a", {"site": "north"}, False),
        ("site", "a", {"site": "x"}, True),
        ("!site", "a", {"site": "x"}, False),
        ("!site", "a", {}, True),
        ("id=cam-*", "cam-01", {}, True),
        ("id=cam-*", "door-01", {}, False),
        ("site=north, hw=jetson", "a", {"site": "north", "hw": "jetson"}, True),
        ("site=north,hw=jetson", "a", {"site": "north", "hw": "x86"}, False),
        ("site=north,id=a|b", "b", {"site": "north"}, True),
    ],
)
def test_selector_matches(selector, device_id, tags, expected):
    assert parse(selector).matches(device_id, tags) is expected


@pytest.mark.parametrize("selector", ["Site=north", "site=no rth", "=x", "site=", "!", "a=b=c"])
def test_selector_refuses_bad_terms(selector):
    with pytest.raises(SelectorError):
        parse(selector)


def test_console_tags_overlay_the_device_tags():
    assert merged_tags({"site": "north", "hw": "x"}, {"site": "south", "hw": ""}) == {"site": "south"}


# -- waves -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "sizes", "expected"),
    [
        (10, ["1", "10%", "50%", "all"], [1, 4, 5]),
        (100, ["1", "10%", "50%", "all"], [1, 9, 40, 50]),
        (1000, ["1", "10%", "50%", "all"], [1, 99, 400, 500]),
        (3, ["1", "1"], [1, 1, 1]),
        (5, ["2", "all"], [2, 3]),
        (4, ["100%"], [4]),
        (2, ["5", "all"], [2]),
    ],
)
def test_split_waves(n, sizes, expected):
    devices = [f"d{i}" for i in range(n)]
    waves = planner.split_waves(devices, sizes)
    assert [len(w) for _, w in waves] == expected
    assert [d for _, w in waves for d in w] == devices


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"change": {"model": M, "set": {"version": "2"}}, "waves": ["0"]}, "wave size"),
        ({"change": {"model": M, "set": {"version": "2"}}, "waves": ["150%"]}, "over 100%"),
        ({"change": {"model": M, "set": {"version": "2"}}, "waves": ["half"]}, "wave size"),
        ({"change": {"model": M, "tenants": []}}, "either"),
        ({"change": {}}, "either"),
        ({"change": {"model": M, "set": {"model": "x"}}}, "cannot change the model"),
        ({"change": {"model": M, "set": {"instances": 0}}}, "set:"),
        ({"change": {"model": M}, "gates": {"soak": 1}}, "Extra inputs"),
    ],
)
def test_spec_refusals(body, problem):
    with pytest.raises(ValidationError, match=problem):
        RolloutSpec.model_validate(body)


def test_spec_takes_waves_as_text():
    spec = RolloutSpec.model_validate({"change": {"model": M, "set": {}}, "waves": "1, 10% ,ALL"})
    assert spec.waves == ["1", "10%", "all"]


# -- the change --------------------------------------------------------------------------------------
def test_a_tenant_change_keeps_the_rest_of_the_tenant():
    current = [
        TenantSpec(model=M, backend="openvino", device="GPU", instances=2),
        TenantSpec(model="efficientnet-lite1"),
    ]
    after = planner.target_tenants(Change(model=M, set={"version": "2.0.0"}), current)
    assert after is not None
    assert (after[0].backend, after[0].device, after[0].instances, after[0].version) == (
        "openvino",
        "GPU",
        2,
        "2.0.0",
    )
    assert after[1] == current[1]
    assert planner.target_tenants(Change(model="mb3-centernet", set={"version": "2"}), current) is None


def test_new_candidates_replace_backend_and_device():
    current = [TenantSpec(model=M, backend="onnxruntime", device="cpu")]
    change = Change(
        model=M,
        set={
            "version": "3",
            "candidates": [
                {"backend": "openvino", "device": "GPU"},
                {"backend": "openvino", "device": "CPU"},
            ],
        },
    )
    after = planner.target_tenants(change, current)
    assert after is not None
    assert (after[0].backend, after[0].device) == ("openvino", "GPU")
    assert [c.label for c in after[0].candidate_list()] == ["openvino:GPU", "openvino:CPU"]


def test_a_model_served_in_two_versions_side_by_side_is_not_changed():
    current = [TenantSpec(model=M, version="1.0.0"), TenantSpec(model=M, version="1.1.0")]
    assert planner.target_tenants(Change(model=M, set={"version": "2.0.0"}), current) is None


def test_an_unpinned_tenant_is_restored_to_the_version_it_served():
    status = Status(
        online=True,
        placement=PlacementStatus(tenants=[TenantStatus(model=M, state="ready", serving_version="1.0.5")]),
    )
    assert planner.pin_versions([TenantSpec(model=M)], {M: ["1.1.0", "1.0.5"]}, status)[0].version == "1.0.5"


def test_an_unpinned_tenant_is_restored_to_the_version_it_ran():
    pinned = planner.pin_versions(
        [TenantSpec(model=M), TenantSpec(model="efficientnet-lite1", version="0.9")], {M: ["1.1.0", "1.0.0"]}
    )
    assert [t.version for t in pinned] == ["1.1.0", "0.9"]


# -- gates -----------------------------------------------------------------------------------------------
def fig(frames=1000, errors=0, fps=20.0, p95=10.0, failovers=0):
    return Figures(ts=0.0, frames_in=frames, errors=errors, fps=fps, p95_ms=p95, failovers=failovers)


@pytest.mark.parametrize(
    ("baseline", "start", "end", "ok", "why"),
    [
        (fig(), fig(1000), fig(2000, 5), True, ""),
        (fig(), fig(1000), fig(2000, 50), False, "error answers 5.0% > 1.0%"),
        (fig(), fig(0), fig(100, 2), True, ""),  # 2% but only 2 errors: not a rate yet
        (fig(), fig(1000), fig(2000, p95=16.0), False, "p95 16.0 ms is 1.60x"),
        (fig(), fig(1000), fig(2000, p95=14.0), True, ""),
        (fig(), fig(1000), fig(2000, fps=10.0), False, "throughput 10.0/s is 50%"),
        (fig(fps=0.2), fig(1000), fig(2000, fps=0.05), True, ""),  # too little traffic to judge
        (fig(), fig(1000), fig(2000, failovers=1), False, "1 failover(s)"),
        (fig(), fig(5000, 10), fig(800, 300), False, "error answers 37.5%"),  # the new tenant's counters
        (None, None, fig(2000, 1, p95=99.0, fps=1.0), True, ""),  # no figures before: ratios not judged
        (fig(), fig(1000), None, False, "no telemetry"),
    ],
)
def test_gates(baseline, start, end, ok, why):
    passed, reason, figures = planner.judge(Gates(), baseline, start, end)
    assert passed is ok
    assert why in reason
    if end is not None and ok:
        assert "error_rate" in figures


def test_failover_allowed_when_asked():
    assert planner.judge(Gates(allow_failover=True), fig(), fig(1000), fig(2000, failovers=2))[0]


# -- scenarios -----------------------------------------------------------------------------------------------
@dataclass
class Dev:
    """A device as the rig plays it: what it serves, and its counters."""

    online: bool = True
    generation: int = 1
    version: str = "1.0.0"
    broken: dict[str, str] = field(default_factory=dict)  # version -> what loading it fails with
    error_share: dict[str, float] = field(
        default_factory=dict
    )  # version -> share of frames answered with errors
    failed_version: str | None = None
    p95: dict[str, float] = field(default_factory=dict)  # version -> its p95 (default 10 ms)
    spike_at: float | None = None  # one telemetry window this slow (a busy second)
    frames: int = 0
    errors: int = 0
    tel_at: float | None = 0.0  # it has sent telemetry before the rollout
    pending: tuple[int, str] | None = None  # a placement not applied yet (offline)


class Rig:
    def __init__(self, n: int, **spec: object) -> None:
        self.devices = {f"d{i}": Dev() for i in range(n)}
        body = {"change": {"model": M, "set": {"version": "2.0.0"}}, "gates": {"soak_s": 10.0}, **spec}
        self.rollout = planner.create("r1", RolloutSpec.model_validate(body), list(self.devices), 0.0, "ops")
        self.now = 0.0
        self.published: list[tuple[str, str, str | None]] = []

    def status(self, dev: Dev) -> Status:
        tenants = [TenantStatus(model=M, version=dev.version, state="ready")]
        if dev.failed_version is not None:
            tenants.append(
                TenantStatus(model=M, version=dev.failed_version, state="failed", error="cannot load")
            )
        return Status(
            online=dev.online,
            placement=PlacementStatus(
                generation=dev.generation, applied_generation=dev.generation, tenants=tenants
            ),
            capabilities=Capabilities(
                installed=[InstalledModel(name=M, versions=[InstalledVersion(version="1.0.0")])]
            ),
        )

    def telemetry(self, device_id: str, dev: Dev) -> Telemetry:
        row = TenantTelemetry(
            model=M,
            backend="onnxruntime",
            device="cpu",
            instances=1,
            state="ready",
            queue_depth=0,
            frames_in=dev.frames,
            errors=dev.errors,
            fps=20.0,
            latency_ms=Percentiles(
                p50=5, p95=50.0 if dev.tel_at == dev.spike_at else dev.p95.get(dev.version, 10.0), p99=60
            ),
        )
        return Telemetry(
            device_id=device_id,
            interval_s=1.0,
            tenants=[row],
            device=DeviceTelemetry(cpu_percent=1, rss_mb=1),
        )

    def views(self) -> dict[str, DeviceView]:
        return {
            d: DeviceView(
                online=dev.online,
                status=self.status(dev),
                telemetry=self.telemetry(d, dev) if dev.tel_at is not None else None,
                telemetry_at=dev.tel_at,
                tenants=[TenantSpec(model=M)],
                installed={M: ["1.0.0"]},
            )
            for d, dev in self.devices.items()
        }

    def apply(self, device_id: str, generation: int, version: str) -> None:
        dev = self.devices[device_id]
        dev.generation = generation
        if version in dev.broken:
            dev.failed_version = version
        else:
            if version != dev.version:
                dev.frames = dev.errors = 0  # a new tenant counts from 0
            dev.version, dev.failed_version = version, None

    def tick(self, dt: float = 1.0) -> list[planner.Place]:
        """Devices send telemetry, the planner steps, its placements are published and applied."""
        self.now += dt
        for dev in self.devices.values():
            if not dev.online:
                continue
            if dev.pending is not None:
                self.apply(next(d for d, x in self.devices.items() if x is dev), *dev.pending)
                dev.pending = None
            dev.frames += 100
            dev.errors += round(100 * dev.error_share.get(dev.version, 0.0))
            dev.tel_at = self.now
        actions = planner.step(self.rollout, self.views(), self.now)
        for action in actions:
            version = action.tenants[0].version
            self.published.append((action.device_id, action.purpose, version))
            generation = self.devices[action.device_id].generation + 1
            planner.published(self.rollout, action.device_id, action.purpose, generation, self.now)
            if self.devices[action.device_id].online:
                self.apply(action.device_id, generation, version or "")
            else:  # retained: applied when it is back
                self.devices[action.device_id].pending = (generation, version or "")
        return actions

    def run(self, until: str, limit: int = 200) -> None:
        for _ in range(limit):
            if self.rollout.state == until:
                return
            self.tick()
        raise AssertionError(f"rollout still {self.rollout.state}, not {until}: {self.rollout.timeline[-3:]}")

    def state(self, device_id: str) -> str:
        return self.rollout.devices[device_id].state


def test_a_good_version_reaches_every_device_wave_by_wave():
    rig = Rig(10)
    actions = rig.tick()
    assert [(a.device_id, a.purpose) for a in actions] == [("d0", "forward")]
    assert actions[0].tenants[0].version == "2.0.0"
    rig.run("completed")
    assert all(dev.version == "2.0.0" for dev in rig.devices.values())
    order = [d for d, purpose, _ in rig.published if purpose == "forward"]
    assert order[0] == "d0" and sorted(order[1:5]) == ["d1", "d2", "d3", "d4"]  # 1, then to 50%, then all
    assert [w.state for w in rig.rollout.waves] == ["passed", "passed", "passed"]
    assert rig.rollout.devices["d0"].figures["error_rate"] == 0.0


def test_a_version_that_fails_to_load_stops_at_wave_one_and_is_rolled_back():
    rig = Rig(10)
    for dev in rig.devices.values():
        dev.broken["2.0.0"] = "cannot load"
    rig.run("rolled_back")
    assert rig.rollout.waves[0].state == "failed"
    assert "cannot load" in rig.rollout.reason
    assert [w.state for w in rig.rollout.waves[1:]] == ["cancelled", "cancelled"]
    assert rig.published == [
        ("d0", "forward", "2.0.0"),
        ("d0", "rollback", "1.0.0"),
    ]  # the version it ran, pinned
    assert rig.state("d0") == "rolled_back" and rig.devices["d0"].failed_version is None
    assert all(rig.state(f"d{i}") == "cancelled" for i in range(1, 10))
    assert rig.rollout.failed_at is not None and rig.rollout.rolled_back_at >= rig.rollout.failed_at


def test_error_answers_fail_the_gate_after_the_soak_and_the_figures_say_so():
    rig = Rig(4, waves=["2", "all"])
    rig.devices["d1"].error_share["2.0.0"] = 0.2
    rig.run("rolled_back")
    wave = rig.rollout.waves[0]
    assert wave.state == "failed" and "d1: error answers 20.0% > 1.0%" in wave.reason
    assert rig.rollout.devices["d1"].figures["error_rate"] == 0.2
    assert rig.state("d0") == "rolled_back" and rig.state("d1") == "rolled_back"  # the whole wave
    assert rig.devices["d0"].version == "1.0.0"
    assert rig.state("d2") == "cancelled"


def test_a_failure_share_within_the_limit_passes_and_restores_only_the_failed():
    rig = Rig(4, waves=["2", "all"], gates={"soak_s": 5.0, "max_failed_share": 0.5})
    rig.devices["d1"].broken["2.0.0"] = "cannot load"
    rig.run("completed")
    assert rig.state("d1") == "rolled_back" and rig.state("d0") == "succeeded"
    assert rig.devices["d3"].version == "2.0.0"


def test_manual_promotion_waits_for_approval():
    rig = Rig(3, waves=["1", "all"], promotion="manual")
    rig.run("waiting_approval")
    for _ in range(5):
        assert rig.tick() == []
    with pytest.raises(RolloutError):
        planner.command(rig.rollout, "resume", rig.now, "ops")
    planner.command(rig.rollout, "approve", rig.now, "ops")
    rig.run("completed")


def test_an_offline_device_gets_the_change_when_it_is_back():
    rig = Rig(4, waves=["1", "all"])
    rig.devices["d3"].online = False
    rig.run("completed")
    assert rig.state("d3") == "targeted" and rig.rollout.devices["d3"].deferred
    assert rig.rollout.is_open()
    rig.devices["d3"].online = True
    for _ in range(20):
        rig.tick()
    assert rig.state("d3") == "succeeded" and rig.devices["d3"].version == "2.0.0"
    assert not rig.rollout.is_open()


def test_a_wave_whose_devices_are_all_offline_is_not_passed():
    rig = Rig(2, waves=["1", "all"])
    rig.devices["d0"].online = False
    rig.devices["d1"].online = False
    for _ in range(30):
        rig.tick()
    assert rig.rollout.state == "running" and rig.rollout.current_wave == 0
    assert rig.published == []


def test_an_offline_device_is_restored_when_it_is_back():
    rig = Rig(4, waves=["2", "all"])
    rig.devices["d0"].broken["2.0.0"] = "cannot load"
    rig.devices["d1"].online = True
    rig.tick()  # both canaries get the change
    rig.devices["d1"].online = False  # d1 goes away before it applies... and the wave fails on d0
    rig.devices["d1"].pending = (rig.devices["d1"].generation + 1, "2.0.0")
    rig.run("rolled_back")
    assert rig.state("d1") == "rolling_back"  # its restore is retained, waiting for it
    assert rig.rollout.is_open()
    rig.devices["d1"].online = True
    for _ in range(5):
        rig.tick()
    assert rig.state("d1") == "rolled_back" and rig.devices["d1"].version == "1.0.0"


def test_pause_holds_new_placements_and_resume_goes_on():
    rig = Rig(3, waves=["1", "all"])
    rig.tick()
    planner.command(rig.rollout, "pause", rig.now, "ops")
    for _ in range(30):
        rig.tick()
    assert [d for d, _, _ in rig.published] == ["d0"]
    assert rig.rollout.current_wave == 0  # a passing wave is not promoted while paused
    planner.command(rig.rollout, "resume", rig.now, "ops")
    rig.run("completed")


def test_abort_keeps_what_was_changed_and_publishes_nothing_more():
    rig = Rig(3, waves=["1", "all"])
    rig.tick()
    planner.command(rig.rollout, "abort", rig.now, "ops")
    for _ in range(30):
        rig.tick()
    assert rig.published == [("d0", "forward", "2.0.0")]
    assert rig.devices["d0"].version == "2.0.0"
    assert rig.state("d1") == "cancelled"
    with pytest.raises(RolloutError):
        planner.command(rig.rollout, "resume", rig.now, "ops")


def test_manual_rollback_restores_every_changed_device():
    rig = Rig(4, waves=["1", "all"])
    rig.run("completed")
    planner.command(rig.rollout, "rollback", rig.now, "ops")
    rig.run("rolled_back")
    assert all(dev.version == "1.0.0" for dev in rig.devices.values())
    assert {d for d, purpose, _ in rig.published if purpose == "rollback"} == set(rig.devices)


def test_apply_timeout_fails_the_device():
    rig = Rig(2, waves=["1", "all"], gates={"soak_s": 1.0, "apply_timeout_s": 5.0})
    rig.tick()
    rec = rig.rollout.devices["d0"]
    rig.devices["d0"].generation -= 1  # the device never applies it
    for _ in range(10):
        planner.step(rig.rollout, rig.views(), rig.now + 1)
        rig.now += 1
    assert rec.state in ("failed", "rollback_queued", "rollback_publishing") and "within 5 s" in rec.reason


def test_a_device_that_fails_after_its_wave_passed_is_restored_and_the_rollout_paused():
    rig = Rig(4, waves=["2", "all"], promotion="manual")
    rig.devices["d1"].online = False  # offline during wave 1, which passes on d0
    rig.devices["d1"].broken["2.0.0"] = "cannot load"
    rig.run("waiting_approval")
    assert rig.state("d1") == "targeted"
    rig.devices["d1"].online = True  # back: it gets the change, which fails there
    for _ in range(3):
        rig.tick()
    assert rig.rollout.state == "paused" and "d1 of passed wave 1" in rig.rollout.reason
    for _ in range(3):
        rig.tick()
    assert rig.state("d1") == "rolled_back" and rig.devices["d1"].failed_version is None


def test_a_restart_publishes_again_what_was_in_flight():
    rig = Rig(2, waves=["1", "all"])
    actions = planner.step(rig.rollout, rig.views(), 1.0)
    assert rig.state(actions[0].device_id) == "publishing"
    restored = planner.Rollout.model_validate_json(rig.rollout.model_dump_json())
    planner.restart(restored)
    assert restored.devices["d0"].state == "targeted"
    again = planner.step(restored, rig.views(), 2.0)
    assert [(a.device_id, a.purpose) for a in again] == [("d0", "forward")]


def test_a_publish_done_again_after_a_takeover_keeps_what_the_device_ran_before():
    """The change went out and was applied, but the process that published it died before writing
    that down: the next holder publishes it again, and a rollback still restores 1.0.0. A publish
    the process still has on its way is left to report back."""
    rig = Rig(2, waves=["1", "all"])
    [action] = planner.step(rig.rollout, rig.views(), 1.0)
    stored = rig.rollout.model_dump_json()  # written before the placement went out
    rig.apply(action.device_id, 2, "2.0.0")
    mine = planner.Rollout.model_validate_json(stored)
    planner.restart(mine, in_flight={"d0"})
    assert mine.devices["d0"].state == "publishing"
    restored = planner.Rollout.model_validate_json(stored)
    planner.restart(restored)
    views = rig.views()  # its placement is the changed one now
    views["d0"] = dataclasses.replace(views["d0"], tenants=[TenantSpec(model=M, version="2.0.0")])
    again = planner.step(restored, views, 2.0)
    assert [(a.device_id, a.tenants[0].version) for a in again] == [("d0", "2.0.0")]
    assert [t.version for t in restored.devices["d0"].before or []] == ["1.0.0"]


def test_a_restart_during_a_rollback_restores_what_was_in_flight():
    rig = Rig(3, waves=["2", "all"])
    actions = planner.step(rig.rollout, rig.views(), 1.0)
    assert len(actions) == 2
    planner.published(rig.rollout, "d0", "forward", 2, 1.0)
    planner.command(rig.rollout, "rollback", 1.5, "ops")  # d1's change still on its way
    restored = planner.Rollout.model_validate_json(rig.rollout.model_dump_json())
    planner.restart(restored)
    assert restored.devices["d1"].state == "rollback_queued"
    again = planner.step(restored, rig.views(), 2.0)
    assert sorted((a.device_id, a.purpose) for a in again) == [("d0", "rollback"), ("d1", "rollback")]


def test_a_device_is_changed_only_once_it_has_figures_from_before():
    rig = Rig(2, waves=["1", "all"])
    rig.devices["d0"].tel_at = None  # the console has not heard its telemetry yet
    assert planner.step(rig.rollout, rig.views(), 1.0) == []
    assert rig.tick() != []  # its telemetry came: now it gets the change, with a baseline
    assert rig.rollout.devices["d0"].baseline is not None


def test_a_slower_version_fails_the_latency_gate_and_a_busy_second_does_not():
    rig = Rig(3, waves=["1", "all"])
    rig.devices["d0"].spike_at = 5.0  # one window at 5x during d0's soak: the median shrugs it off
    rig.devices["d1"].p95["2.0.0"] = 20.0  # twice as slow, every window
    rig.run("rolled_back")
    assert rig.state("d0") == "succeeded" and rig.rollout.devices["d0"].figures["p95_factor"] == 1.0
    assert 50.0 in rig.rollout.devices["d0"].p95_samples  # the spike was in its soak
    assert "d1: p95 20.0 ms is 2.00x its 10.0 ms before (limit 1.5x)" in rig.rollout.reason
    assert rig.state("d1") == "rolled_back" and rig.state("d0") == "succeeded"  # wave 1 passed and keeps it

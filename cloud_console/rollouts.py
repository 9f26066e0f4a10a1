"""Staged rollouts, the decisions (docs/fleet.md#rollouts): a planner with no I/O and no clock.

`step(rollout, views, now)` looks at a rollout record and what the devices report (status and
telemetry, as `DeviceView`s) and moves the record on: a device's change is published, applied, soaked
and judged by the gates; a wave that passes promotes the next (or waits for approval); a wave that
fails stops the rollout and queues the restore of its devices. It returns the placements to publish
(`Place`); the engine (cloud_console/rollout_engine.py) publishes them and reports back with
`published` / `publish_failed`. Every decision is here, so the engine does not re-decide, and a
table of unit tests (tests/test_rollout_planner.py) covers them. The record is a pydantic model: the
engine stores it as JSON and a restarted console carries on from it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.protocol.editing import DesiredPlacement, Tracking, track
from agent.protocol.schemas import Status, Telemetry, TenantSpec

RolloutState = Literal[
    "running", "paused", "waiting_approval", "rolling_back", "completed", "rolled_back", "aborted"
]
DeviceState = Literal[
    "targeted",  # in a wave, nothing published yet (offline devices wait here)
    "publishing",  # its placement is being delivered / published
    "applying",  # published; waiting for the device to apply it with every tenant ready
    "soaking",  # applied: the gates are judged after the soak time
    "succeeded",
    "failed",
    "rollback_queued",  # its placement before the change is to be published again
    "rollback_publishing",
    "rolling_back",  # restore published; waiting for the device to apply it
    "rolled_back",
    "rollback_failed",
    "cancelled",  # its wave never came (rollout stopped), nothing was published to it
    "skipped",  # the change does not apply to it, or someone else changed it meanwhile
]
TERMINAL_ROLLOUT = ("completed", "rolled_back", "aborted")
OPEN_DEVICE = ("targeted", "publishing", "applying", "soaking")
ROLLBACK_OPEN = ("rollback_queued", "rollback_publishing", "rolling_back")
CHANGED = ("publishing", "applying", "soaking", "succeeded", "failed")  # got (or gets) the change
TIMELINE_LIMIT = 300  # device-level events beyond this are counted, not kept
PUBLISH_RETRY_S = 5.0
P95_SAMPLES = 120  # telemetry windows kept per device for the soak's median p95


class RolloutError(ValueError):
    """A rollout request that cannot be done (bad spec, or a command the state does not allow)."""


class Gates(BaseModel):
    """Health gates, judged per device after `soak_s` of serving the change."""

    model_config = ConfigDict(extra="forbid")
    soak_s: float = Field(default=60.0, ge=0.0, le=7 * 86400.0)
    apply_timeout_s: float = Field(default=600.0, gt=0.0, le=7 * 86400.0)
    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)  # error answers / frames in
    min_errors: int = Field(default=3, ge=1)  # fewer error answers are not a rate (a short soak)
    max_p95_factor: float = Field(default=1.5, ge=1.0)  # p95 after / the device's own p95 before
    min_throughput_ratio: float = Field(default=0.7, ge=0.0, le=1.0)  # fps after / fps before
    allow_failover: bool = False
    max_failed_share: float = Field(default=0.0, ge=0.0, lt=1.0)  # of a wave's devices; 0: none may
    min_fps: float = Field(default=1.0, ge=0.0)  # below this, too little traffic to judge ratios


class Change(BaseModel):
    """What a rollout changes: one tenant (`model` with fields to `set`), or a whole placement."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    tenants: list[TenantSpec] | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _one_kind(self) -> Change:
        if (self.model is None) == (self.tenants is None):
            raise ValueError("give either `model` (with `set`) or `tenants` (a whole placement)")
        if self.model is not None:
            if "model" in self.set:
                raise ValueError("`set` cannot change the model; roll out a placement instead")
            try:  # the fields must make a valid tenant on their own (device fields aside)
                TenantSpec.model_validate({"model": self.model, **self.set})
            except ValidationError as exc:
                raise ValueError(f"set: {exc.errors()[0]['msg']}") from exc
        return self

    def models(self) -> list[str]:
        return [self.model] if self.model is not None else [t.model for t in self.tenants or []]


class RolloutSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=100)
    selector: str = Field(default="*", max_length=1000)
    change: Change
    waves: list[str] = Field(default_factory=lambda: ["1", "10%", "50%", "all"], min_length=1, max_length=20)
    gates: Gates = Field(default_factory=Gates)
    promotion: Literal["auto", "manual"] = "auto"

    @field_validator("waves", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        out = []
        for raw in value if isinstance(value, list) else []:
            text = str(raw).strip().lower()
            number = text[:-1] if text.endswith("%") else text
            if text != "all" and not (number.isdigit() and int(number) > 0):
                raise ValueError(f"wave size {raw!r}: a count (3), a share of the target (10%) or 'all'")
            if text.endswith("%") and int(number) > 100:
                raise ValueError(f"wave size {raw!r}: over 100%")
            out.append(text)
        return out if out or not isinstance(value, list) else value


class Figures(BaseModel):
    """A device's figures for the changed models from one telemetry message."""

    ts: float
    frames_in: int = 0
    errors: int = 0  # frames answered with an error (overload drops and stalls included)
    fps: float = 0.0
    p95_ms: float = 0.0
    failovers: int = 0


class DeviceRecord(BaseModel):
    wave: int
    state: DeviceState = "targeted"
    before: list[TenantSpec] | None = None  # its placement before the change, versions pinned
    after: list[TenantSpec] | None = None
    generation: int | None = None
    published_at: float | None = None
    applied_at: float | None = None
    soak_from: float | None = None
    baseline: Figures | None = None  # before the change
    at_soak: Figures | None = None  # when the soak began
    figures: dict[str, float | None] = Field(default_factory=dict)  # what the gates judged
    rollback_generation: int | None = None
    rollback_published_at: float | None = None
    rolled_back_at: float | None = None
    retry_at: float = 0.0
    p95_samples: list[float] = Field(default_factory=list)  # each telemetry window's p95 in the soak
    p95_at: float | None = None
    waiting_since: float | None = None
    deferred: bool = False  # offline when its wave came: gets the change when it is back
    reason: str = ""


class WaveRecord(BaseModel):
    index: int
    size: str
    devices: list[str]
    state: Literal["pending", "running", "passed", "failed", "cancelled"] = "pending"
    started_at: float | None = None
    decided_at: float | None = None
    reason: str = ""
    figures: dict[str, float | int | None] = Field(default_factory=dict)


class Event(BaseModel):
    ts: float
    kind: str
    message: str
    device_id: str | None = None
    wave: int | None = None


class Rollout(BaseModel):
    id: str
    spec: RolloutSpec
    created_at: float
    created_by: str
    base_url: str = ""
    state: RolloutState = "running"
    current_wave: int = 0
    waves: list[WaveRecord]
    devices: dict[str, DeviceRecord]
    timeline: list[Event] = Field(default_factory=list)
    events_dropped: int = 0
    reason: str = ""
    failed_at: float | None = None  # when a gate failed (the rollback clock starts)
    rolled_back_at: float | None = None
    finished_at: float | None = None

    def note(
        self, now: float, kind: str, message: str, device_id: str | None = None, wave: int | None = None
    ) -> None:
        if device_id is not None and len(self.timeline) >= TIMELINE_LIMIT:
            self.events_dropped += 1
            return
        self.timeline.append(Event(ts=now, kind=kind, message=message, device_id=device_id, wave=wave))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in self.devices.values():
            out[rec.state] = out.get(rec.state, 0) + 1
        return out

    def is_open(self) -> bool:
        """Work left: not finished, or a device still to apply or restore (it was offline)."""
        if self.state not in TERMINAL_ROLLOUT:
            return True
        watched: tuple[str, ...] = (*ROLLBACK_OPEN, "applying", "soaking", "publishing")
        if self.state == "completed":
            watched = (*watched, "targeted")
        return any(rec.state in watched for rec in self.devices.values())


@dataclass(frozen=True)
class DeviceView:
    """What the console knows of a device now (built by the engine from the fleet)."""

    online: bool
    status: Status | None = None
    telemetry: Telemetry | None = None
    telemetry_at: float | None = None
    tenants: list[TenantSpec] | None = None  # what an edit starts from (only asked for when needed)
    installed: dict[str, list[str]] | None = None  # model -> versions, newest first


@dataclass(frozen=True)
class Place:
    """Publish this placement to the device: the change (`forward`) or its restore (`rollback`)."""

    device_id: str
    tenants: list[TenantSpec]
    purpose: Literal["forward", "rollback"]


# -- pure helpers -------------------------------------------------------------------------------------
def split_waves(devices: list[str], sizes: list[str]) -> list[tuple[str, list[str]]]:
    """Devices into waves: a count is that many more devices, a percentage is the share of the target
    covered once the wave is done, `all` the rest. Devices no size reaches form a last wave."""
    n, taken, out = len(devices), 0, []
    for size in sizes:
        if size == "all":
            k = n - taken
        elif size.endswith("%"):
            k = math.ceil(n * int(size[:-1]) / 100) - taken
        else:
            k = int(size)
        k = max(0, min(k, n - taken))
        if k:
            out.append((size, devices[taken : taken + k]))
            taken += k
    if taken < n:
        out.append(("all", devices[taken:]))
    return out


def target_tenants(change: Change, current: list[TenantSpec]) -> list[TenantSpec] | None:
    """The device's placement with the change made; None when it does not run the changed model."""
    if change.tenants is not None:
        return [t.model_copy(deep=True) for t in change.tenants]
    if sum(1 for t in current if t.model == change.model) != 1:
        return None  # runs none, or two versions side by side: which one to change is not said
    out, found = [], False
    for tenant in current:
        if tenant.model != change.model:
            out.append(tenant)
            continue
        found = True
        base = tenant.model_dump(exclude_defaults=True)
        if "candidates" in change.set:  # a new candidate list names its own first backend/device
            base.pop("backend", None)
            base.pop("device", None)
        elif "backend" in change.set or "device" in change.set:
            base.pop("candidates", None)  # a new place replaces the old candidate list
        out.append(TenantSpec.model_validate({**base, **change.set}))
    return out if found else None


def pin_versions(
    tenants: list[TenantSpec], installed: dict[str, list[str]] | None, status: Status | None = None
) -> list[TenantSpec]:
    """A tenant that ran "the newest version" is restored to the version it served then (its
    status's `serving_version`, else the newest installed): once the change delivered a newer one, an
    unpinned tenant would otherwise serve the new one."""
    serving = {
        t.model: t.serving_version
        for t in (status.placement.tenants if status is not None and status.placement is not None else [])
        if t.version is None and t.serving_version and t.state == "ready"
    }
    out = []
    for tenant in tenants:
        version = serving.get(tenant.model) or next(iter((installed or {}).get(tenant.model) or []), None)
        pinned = tenant.version is None and version is not None
        out.append(tenant.model_copy(update={"version": version}) if pinned else tenant)
    return out


def figures_of(telemetry: Telemetry | None, at: float | None, models: list[str]) -> Figures | None:
    if telemetry is None or at is None:
        return None
    # A tenant beside another version of its model reports as `name@version`.
    rows = [t for t in telemetry.tenants if t.model.split("@")[0] in models and t.state != "draining"]
    if not rows:
        return None
    return Figures(
        ts=at,
        frames_in=sum(t.frames_in for t in rows),
        errors=sum(t.errors for t in rows),
        fps=sum(t.fps for t in rows),
        p95_ms=max(t.latency_ms.p95 for t in rows),
        failovers=sum(t.failovers for t in rows),
    )


def judge(
    gates: Gates, baseline: Figures | None, start: Figures | None, end: Figures | None
) -> tuple[bool, str, dict[str, float | None]]:
    """The gates over a soak: (passed, why not, the figures). Counters that went down restarted (a
    new tenant starts at 0), so the soak's own count is then the end figure itself."""
    if end is None:
        return False, "no telemetry for the changed model after the soak", {}
    restarted = start is None or end.frames_in < start.frames_in or end.errors < start.errors
    frames = end.frames_in - (0 if restarted or start is None else start.frames_in)
    errors = end.errors - (0 if restarted or start is None else start.errors)
    failovers = end.failovers - (0 if start is None or end.failovers < start.failovers else start.failovers)
    figures: dict[str, float | None] = {
        "frames": float(frames),
        "error_rate": round(errors / frames, 4) if frames > 0 else None,
        "p95_ms": end.p95_ms,
        "p95_before_ms": baseline.p95_ms if baseline else None,
        "p95_factor": None,
        "fps": end.fps,
        "fps_before": baseline.fps if baseline else None,
        "throughput_ratio": None,
        "failovers": float(failovers),
    }
    problems = []
    rate = figures["error_rate"]
    if rate is not None and rate > gates.max_error_rate and errors >= gates.min_errors:
        problems.append(f"error answers {rate:.1%} > {gates.max_error_rate:.1%}")
    if baseline is not None and baseline.p95_ms > 0 and end.p95_ms > 0:
        factor = round(end.p95_ms / baseline.p95_ms, 2)
        figures["p95_factor"] = factor
        if factor > gates.max_p95_factor:
            problems.append(
                f"p95 {end.p95_ms:.1f} ms is {factor:.2f}x its {baseline.p95_ms:.1f} ms before"
                f" (limit {gates.max_p95_factor:g}x)"
            )
    if baseline is not None and baseline.fps >= gates.min_fps:
        ratio = round(end.fps / baseline.fps, 2)
        figures["throughput_ratio"] = ratio
        if ratio < gates.min_throughput_ratio:
            problems.append(
                f"throughput {end.fps:.1f}/s is {ratio:.0%} of {baseline.fps:.1f}/s before"
                f" (limit {gates.min_throughput_ratio:.0%})"
            )
    if failovers > 0 and not gates.allow_failover:
        problems.append(f"{failovers} failover(s) during the soak")
    return not problems, "; ".join(problems), figures


def create(
    rollout_id: str,
    spec: RolloutSpec,
    targets: list[str],
    now: float,
    user: str,
    base_url: str = "",
) -> Rollout:
    """A new rollout over `targets` (in the order waves take them: canaries first)."""
    if not targets:
        raise RolloutError(f"no device matches {spec.selector!r}")
    waves = [
        WaveRecord(index=i, size=size, devices=devices)
        for i, (size, devices) in enumerate(split_waves(targets, spec.waves))
    ]
    devices = {d: DeviceRecord(wave=w.index) for w in waves for d in w.devices}
    rollout = Rollout(
        id=rollout_id,
        spec=spec,
        created_at=now,
        created_by=user,
        base_url=base_url,
        waves=waves,
        devices=devices,
    )
    sizes = ", ".join(str(len(w.devices)) for w in waves)
    rollout.note(now, "created", f"{user} created it: {len(targets)} devices in {len(waves)} waves ({sizes})")
    return rollout


# -- commands -------------------------------------------------------------------------------------------
def command(rollout: Rollout, op: str, now: float, user: str) -> None:
    """pause | resume | approve | abort | rollback, from a person; RolloutError when not allowed now."""
    state = rollout.state
    if op == "pause":
        if state not in ("running", "waiting_approval"):
            raise RolloutError(f"cannot pause a rollout that is {state}")
        rollout.state = "paused"
    elif op == "resume":
        if state != "paused":
            raise RolloutError(f"cannot resume a rollout that is {state}")
        rollout.state = "running"
    elif op == "approve":
        if state != "waiting_approval":
            raise RolloutError(f"nothing to approve: the rollout is {state}")
        rollout.state = "running"
        rollout.current_wave += 1
    elif op == "abort":
        if state in TERMINAL_ROLLOUT or state == "rolling_back":
            raise RolloutError(f"cannot abort a rollout that is {state}")
        rollout.state = "aborted"
        rollout.finished_at = now
        _cancel_untouched(rollout, now)
    elif op == "rollback":
        if state in ("rolling_back", "rolled_back"):
            raise RolloutError(f"the rollout is already {state.replace('_', ' ')}")
        rollout.state = "rolling_back"
        rollout.failed_at = rollout.failed_at or now
        rollout.reason = f"rolled back by {user}"
        _cancel_untouched(rollout, now)
        for rec in rollout.devices.values():
            if rec.state in CHANGED:
                _queue_rollback(rec)
    else:
        raise RolloutError(f"unknown command {op!r}")
    rollout.note(now, op, f"{user}: {op}")


def _cancel_untouched(rollout: Rollout, now: float) -> None:
    for rec in rollout.devices.values():
        if rec.state == "targeted":
            rec.state = "cancelled"
    for wave in rollout.waves:
        if wave.state == "pending":
            wave.state = "cancelled"


def _queue_rollback(rec: DeviceRecord) -> None:
    if rec.state == "publishing":
        rec.reason = rec.reason or "rolled back"
    rec.state = "rollback_queued" if rec.before is not None else "skipped"
    rec.retry_at = 0.0


# -- the engine's reports ----------------------------------------------------------------------------
def published(rollout: Rollout, device_id: str, purpose: str, generation: int, now: float) -> None:
    rec = rollout.devices[device_id]
    if purpose == "forward":
        rec.generation, rec.published_at, rec.waiting_since = generation, now, now
        # A rollback decided while this was on its way is queued now that the change is out.
        rec.state = "rollback_queued" if rollout.state in ("rolling_back", "rolled_back") else "applying"
    else:
        rec.rollback_generation, rec.rollback_published_at = generation, now
        rec.state = "rolling_back"


def publish_failed(rollout: Rollout, device_id: str, purpose: str, reason: str, now: float) -> None:
    rec = rollout.devices[device_id]
    if purpose == "forward":
        rec.state = "failed"
        rec.reason = reason
        rollout.note(now, "device_failed", f"{device_id}: {reason}", device_id, rec.wave)
    else:  # the restore must go out: try again shortly
        rec.state = "rollback_queued"
        rec.retry_at = now + PUBLISH_RETRY_S
        rec.reason = reason


def restart(rollout: Rollout, in_flight: Collection[str] = ()) -> None:
    """After a console restart (or a takeover by another process, or a record read again): a publish
    that was in flight is done again (a placement published twice is the same tenants under a newer
    generation, which the device applies without a change). `in_flight`: devices whose publish this
    process still has on its way (it reports back)."""
    undoing = rollout.state in ("rolling_back", "rolled_back")
    for device_id, rec in rollout.devices.items():
        if device_id in in_flight:
            continue
        if rec.state == "publishing":  # restored anyway when the rollout is being undone
            rec.state = "rollback_queued" if undoing and rec.before is not None else "targeted"
        elif rec.state == "rollback_publishing":
            rec.state = "rollback_queued"


# -- the step --------------------------------------------------------------------------------------------
def step(rollout: Rollout, views: dict[str, DeviceView], now: float) -> list[Place]:
    """Move the rollout on from what the devices report now; the placements to publish."""
    actions: list[Place] = []
    models = rollout.spec.change.models()
    offline = DeviceView(online=False)
    if rollout.state == "running" and rollout.current_wave < len(rollout.waves):
        wave = rollout.waves[rollout.current_wave]
        if wave.state == "pending":
            wave.state, wave.started_at = "running", now
            rollout.note(
                now,
                "wave_started",
                f"wave {wave.index + 1} ({wave.size}): {len(wave.devices)} devices",
                wave=wave.index,
            )
    for device_id, rec in rollout.devices.items():
        view = views.get(device_id) or offline
        if rec.state == "targeted":
            if _may_start(rollout, rec):
                _start_device(rollout, device_id, rec, view, models, now, actions)
        elif rec.state == "applying":
            _applying(rollout, device_id, rec, view, now)
        elif rec.state == "soaking":
            _soaking(rollout, device_id, rec, view, models, now)
        elif rec.state == "rollback_queued" and now >= rec.retry_at and rec.before is not None:
            rec.state = "rollback_publishing"
            actions.append(Place(device_id, [t.model_copy(deep=True) for t in rec.before], "rollback"))
        elif rec.state == "rolling_back":
            _rolling_back(rollout, device_id, rec, view, now)
    _late_failures(rollout, now)
    if rollout.state in ("running", "paused", "waiting_approval"):
        _judge_wave(rollout, views, now)
    if rollout.state == "rolling_back" and not any(
        rec.state in ("rollback_queued", "rollback_publishing")
        or (rec.state == "rolling_back" and (views.get(d) or offline).online)
        for d, rec in rollout.devices.items()
    ):
        _rolled_back(rollout, now)
    return actions


def _may_start(rollout: Rollout, rec: DeviceRecord) -> bool:
    """Its wave is the one running, or passed while the device was offline (it gets it now)."""
    if rollout.state == "running" and rec.wave == rollout.current_wave:
        return True
    passed = rollout.waves[rec.wave].state == "passed"
    return passed and rollout.state in ("running", "waiting_approval", "completed")


def _start_device(
    rollout: Rollout,
    device_id: str,
    rec: DeviceRecord,
    view: DeviceView,
    models: list[str],
    now: float,
    actions: list[Place],
) -> None:
    if not view.online:
        if not rec.deferred:
            rec.deferred = True
            rollout.note(
                now,
                "deferred",
                f"{device_id} is offline: it gets the change when it is back",
                device_id,
                rec.wave,
            )
        return
    if view.telemetry is None:
        return  # no figures from before the change yet (a console just started): its gates need them
    current = view.tenants or []
    after = target_tenants(rollout.spec.change, current)
    if after is None:
        rec.state = "skipped"
        rec.reason = f"runs no {rollout.spec.change.model}, or two versions of it side by side"
        return
    if rec.before is None:  # else a publish before a restart recorded it: the device may run `after`
        rec.before = pin_versions(current, view.installed, view.status)
    rec.after = after
    rec.baseline = figures_of(view.telemetry, view.telemetry_at, models)
    rec.state = "publishing"
    actions.append(Place(device_id, [t.model_copy(deep=True) for t in after], "forward"))


def version_state(tenants: list[TenantSpec], status: Status | None) -> tuple[str, str]:
    """("ready" | "loading" | "failed", why) for the pinned versions: a tenant whose new version fails
    to load leaves the old one serving (status lists the model twice), which `track` counts as
    applied, so the version each tenant serves is checked here."""
    listed = status.placement.tenants if status is not None and status.placement is not None else []
    waiting = False
    for spec in tenants:
        if spec.version is None:
            continue
        mine = [
            t for t in listed if t.model == spec.model and t.version == spec.version and t.state != "draining"
        ]
        if any(t.state == "ready" for t in mine):
            continue
        failed = next((t for t in mine if t.state == "failed"), None)
        if failed is not None:
            return "failed", f"{spec.model} {spec.version}: {failed.error or 'failed'}"
        waiting = True
    return ("loading", "") if waiting else ("ready", "")


def _tracked(
    tenants: list[TenantSpec], generation: int | None, at: float | None, view: DeviceView
) -> Tracking:
    """Where the placement stands, with the versions checked (see version_state)."""
    tracking = track(DesiredPlacement(generation or 0, tenants, at), view.status)
    if tracking.state == "applied":
        state, why = version_state(tenants, view.status)
        if state == "failed":
            tracking.state, tracking.reason = "failed", why
        elif state == "loading":
            tracking.state, tracking.reason = "pending", "version loading"
    return tracking


def _applying(rollout: Rollout, device_id: str, rec: DeviceRecord, view: DeviceView, now: float) -> None:
    tracking = _tracked(rec.after or [], rec.generation, rec.published_at, view)
    if tracking.state == "applied":
        rec.state, rec.applied_at, rec.soak_from = "soaking", now, None
    elif tracking.state in ("failed", "refused"):
        _fail(rollout, device_id, rec, f"not applied: {tracking.reason}", now)
    elif tracking.state == "superseded":
        rec.state, rec.reason = "skipped", "changed by someone else during the rollout"
        rollout.note(now, "device_skipped", f"{device_id}: {rec.reason}", device_id, rec.wave)
    elif not view.online:
        rec.deferred, rec.waiting_since = True, None
    elif rec.waiting_since is None:
        rec.waiting_since = now  # the apply timeout counts while the device is online
    elif now - rec.waiting_since > rollout.spec.gates.apply_timeout_s:
        _fail(rollout, device_id, rec, f"not applied within {rollout.spec.gates.apply_timeout_s:g} s", now)


def _soaking(
    rollout: Rollout, device_id: str, rec: DeviceRecord, view: DeviceView, models: list[str], now: float
) -> None:
    tracking = _tracked(rec.after or [], rec.generation, rec.published_at, view)
    if tracking.state in ("failed", "refused"):
        _fail(rollout, device_id, rec, f"stopped serving: {tracking.reason}", now)
        return
    if tracking.state == "superseded":
        rec.state, rec.reason = "skipped", "changed by someone else during the rollout"
        return
    if not view.online:
        rec.soak_from, rec.deferred = None, True  # the soak starts again when it is back
        return
    if rec.soak_from is None:
        # Counters from telemetry sent after the apply: the new tenant's, not the old one's.
        if (
            view.telemetry_at is not None
            and rec.applied_at is not None
            and view.telemetry_at > rec.applied_at
        ):
            rec.at_soak = figures_of(view.telemetry, view.telemetry_at, models)
            rec.soak_from = view.telemetry_at
            rec.p95_samples = []
        return
    latest = figures_of(view.telemetry, view.telemetry_at, models)
    if latest is not None and latest.ts > rec.soak_from and latest.ts != rec.p95_at:
        rec.p95_samples = [*rec.p95_samples[-(P95_SAMPLES - 1) :], latest.p95_ms]
        rec.p95_at = latest.ts
    end = rec.soak_from + rollout.spec.gates.soak_s
    if (
        now < end
        or view.telemetry_at is None
        or view.telemetry_at < end
        or view.telemetry_at <= rec.soak_from
    ):
        return
    if latest is not None and rec.p95_samples:
        # The median of the soak's windows: one telemetry window's p95 is a second or a few of
        # frames, and a single slow second (a busy host) is not a slower version.
        latest = latest.model_copy(update={"p95_ms": statistics.median(rec.p95_samples)})
    ok, why, figures = judge(rollout.spec.gates, rec.baseline, rec.at_soak, latest)
    rec.figures = figures
    if ok:
        rec.state = "succeeded"
    else:
        _fail(rollout, device_id, rec, why, now)


def _fail(rollout: Rollout, device_id: str, rec: DeviceRecord, reason: str, now: float) -> None:
    rec.state, rec.reason = "failed", reason
    rollout.note(now, "device_failed", f"{device_id}: {reason}", device_id, rec.wave)


def _rolling_back(rollout: Rollout, device_id: str, rec: DeviceRecord, view: DeviceView, now: float) -> None:
    tracking = _tracked(rec.before or [], rec.rollback_generation, rec.rollback_published_at, view)
    if tracking.state == "applied":
        rec.state, rec.rolled_back_at = "rolled_back", now
    elif tracking.state in ("failed", "refused"):
        rec.state, rec.reason = "rollback_failed", f"restore not applied: {tracking.reason}"
        rollout.note(now, "rollback_failed", f"{device_id}: {rec.reason}", device_id, rec.wave)
    elif tracking.state == "superseded":
        rec.state, rec.reason = "skipped", "changed by someone else during the rollback"


def _late_failures(rollout: Rollout, now: float) -> None:
    """A device of a wave that already passed (it was offline then) failed on its return: restore it,
    and pause a rollout still going so that a person looks."""
    for device_id, rec in rollout.devices.items():
        if rec.state != "failed" or rollout.waves[rec.wave].state != "passed":
            continue
        _queue_rollback(rec)
        rollout.note(
            now, "rollback", f"{device_id} failed after its wave passed: restoring it", device_id, rec.wave
        )
        if rollout.state in ("running", "waiting_approval"):
            rollout.state = "paused"
            rollout.reason = (
                f"paused: {device_id} of passed wave {rec.wave + 1} failed its gates ({rec.reason})"
            )
            rollout.note(now, "paused", rollout.reason)


def _judge_wave(rollout: Rollout, views: dict[str, DeviceView], now: float) -> None:
    """Fail the running wave (and queue its restore), or pass it and promote the next."""
    if rollout.current_wave >= len(rollout.waves):
        return
    wave = rollout.waves[rollout.current_wave]
    if wave.state != "running":
        return
    recs = {d: rollout.devices[d] for d in wave.devices}
    counted = {d: r for d, r in recs.items() if r.state not in ("skipped", "cancelled")}
    failed = [d for d, r in counted.items() if r.state == "failed"]
    succeeded = [d for d, r in counted.items() if r.state == "succeeded"]
    wave.figures = _wave_figures(list(recs.values()))
    if failed and len(failed) > rollout.spec.gates.max_failed_share * len(counted):
        wave.state, wave.decided_at = "failed", now
        first = failed[0]
        wave.reason = (
            f"{len(failed)} of {len(counted)} devices failed the gates; first: {first}: "
            f"{rollout.devices[first].reason}"
        )
        rollout.state, rollout.failed_at = "rolling_back", now
        rollout.reason = f"wave {wave.index + 1} failed: {wave.reason}"
        rollout.note(now, "wave_failed", rollout.reason, wave=wave.index)
        for rec in recs.values():
            if rec.state in CHANGED:
                _queue_rollback(rec)
        _cancel_untouched(rollout, now)
        return
    if rollout.state != "running":
        return  # paused: a failure still stops it, but nothing is promoted
    online = [r for d, r in counted.items() if r.state in OPEN_DEVICE and (views.get(d) or _OFF).online]
    if online or (counted and not succeeded):
        return  # devices still soaking, or no device online yet to judge the wave by
    wave.state, wave.decided_at = "passed", now
    deferred = sum(1 for r in counted.values() if r.state in OPEN_DEVICE)
    extra = f", {deferred} offline (they get it when back)" if deferred else ""
    if failed:
        extra += f", {len(failed)} failed within the limit (restored)"
        for d in failed:
            _queue_rollback(rollout.devices[d])
    rollout.note(
        now,
        "wave_passed",
        f"wave {wave.index + 1} passed: {len(succeeded)} devices succeeded{extra}",
        wave=wave.index,
    )
    if wave.index == len(rollout.waves) - 1:
        rollout.state, rollout.finished_at = "completed", now
        done = sum(1 for r in rollout.devices.values() if r.state == "succeeded")
        rollout.note(now, "completed", f"completed: {done} devices serve the change")
    elif rollout.spec.promotion == "manual":
        rollout.state = "waiting_approval"
        rollout.note(now, "waiting_approval", f"wave {wave.index + 2} waits for approval")
    else:
        rollout.current_wave += 1
        rollout.note(now, "promoted", f"promoted to wave {wave.index + 2}", wave=wave.index + 1)


_OFF = DeviceView(online=False)


def _wave_figures(recs: list[DeviceRecord]) -> dict[str, float | int | None]:
    """Per state counts and the worst figures of the devices judged."""
    out: dict[str, float | int | None] = {}
    for rec in recs:
        out[rec.state] = int(out.get(rec.state) or 0) + 1
    for key, worst in (("error_rate", max), ("p95_factor", max), ("throughput_ratio", min)):
        values = [v for r in recs if (v := r.figures.get(key)) is not None]
        out[f"worst_{key}"] = worst(values) if values else None
    return out


def _rolled_back(rollout: Rollout, now: float) -> None:
    rollout.state, rollout.rolled_back_at, rollout.finished_at = "rolled_back", now, now
    done = sum(1 for r in rollout.devices.values() if r.state == "rolled_back")
    pending = sum(1 for r in rollout.devices.values() if r.state == "rolling_back")
    took = now - rollout.failed_at if rollout.failed_at is not None else 0.0
    extra = f"; {pending} offline get it when back" if pending else ""
    rollout.note(
        now,
        "rolled_back",
        f"rolled back: {done} devices serve the placement they had before"
        f" ({took:.1f} s after the gate failed){extra}",
    )

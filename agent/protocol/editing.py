"""Editing placements, pure (no I/O): the rules `edge-agent place` and the console share.

Where an edit starts from (`current_tenants`), which generation comes next (`next_generation`), moving
a tenant, and whether a published placement was applied (`track`). Whoever publishes a desired
placement (retained, QoS 1) on edge/<id>/placement learns the outcome only from the agent's retained
status (docs/protocol.md): `applied_generation` reaching the published generation
with the tenants ready means applied; an entry in `status.errors` naming that generation means refused.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field
from typing import Literal

from agent.protocol.schemas import Capabilities, Placement, Status, TenantSpec, TenantStatus

AUTO = "auto"
# Agent error lines: "<UTC timestamp> placement generation 7 refused: <reason>"
# and, for a document that does not validate, "<UTC timestamp> placement refused: <reason>".
_REFUSED_GEN_RE = re.compile(r"placement generation (\d+) refused: (.*)$")
_REFUSED_DOC_RE = re.compile(r"placement refused: (.*)$")
_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) ")

PlacementState = Literal["none", "pending", "applied", "failed", "refused", "superseded"]


class PlacementInvalid(ValueError):
    """A requested placement the device cannot run; the message says why (HTTP 422)."""


@dataclass
class DesiredPlacement:
    """The retained placement document for one device, as this console knows it."""

    generation: int
    tenants: list[TenantSpec]
    published_at: float | None = None  # set when this console published it
    by: str | None = None
    action: str = "seen"  # edit | auto | move | seen (read back from the broker)


@dataclass
class Tracking:
    """Where a published placement stands, from the device's own status."""

    generation: int | None
    state: PlacementState
    reason: str = ""
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "state": self.state,
            "reason": self.reason,
            "problems": self.problems,
        }


def _error_time(line: str) -> float | None:
    match = _TS_RE.match(line)
    if match is None:
        return None
    return float(calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%SZ")))


def refusal_for(generation: int, errors: list[str], published_at: float | None) -> str | None:
    """The agent's reason for refusing `generation`, if its status errors say so."""
    for line in reversed(errors):
        match = _REFUSED_GEN_RE.search(line)
        if match is not None and int(match.group(1)) == generation:
            return match.group(2)
    if published_at is not None:
        # A document that fails validation is refused without a generation: match it by time
        # (the agent stamps errors to the second, so allow the second we published in).
        for line in reversed(errors):
            match = _REFUSED_DOC_RE.search(line)
            if match is None or _REFUSED_GEN_RE.search(line):
                continue
            stamp = _error_time(line)
            if stamp is not None and stamp >= int(published_at) - 1:
                return match.group(1)
    return None


def _same_tenant(spec: TenantSpec, status: TenantStatus) -> bool:
    """`status` runs `spec`. An "auto" backend or device matches what the agent chose for it, and
    an `auto_tune` tenant's instances what it tuned."""
    chosen = status.auto is not None
    return (
        spec.model == status.model
        and spec.version == status.version  # two versions of one model are two tenants
        and (spec.backend == status.backend or (spec.backend == "auto" and chosen))
        and (spec.device.lower() == status.device.lower() or (spec.device.lower() == "auto" and chosen))
        and (spec.instances == status.instances or (spec.auto_tune and chosen))
    )


def _resolved(spec: TenantSpec, status: Status | None) -> TenantSpec:
    """An "auto" tenant as the agent placed it (so that an edit or a move starts from what runs)."""
    if (
        (spec.backend != "auto" and spec.device.lower() != "auto")
        or status is None
        or status.placement is None
    ):
        return spec.model_copy(deep=True)
    for t in status.placement.tenants:
        if t.state in ("ready", "loading") and _same_tenant(spec, t):
            return spec.model_copy(update={"backend": t.backend, "device": t.device}, deep=True)
    return spec.model_copy(deep=True)


def track(desired: DesiredPlacement | None, status: Status | None) -> Tracking:
    """Compare the desired placement with what the device reports."""
    if desired is None:
        return Tracking(None, "none")
    gen = desired.generation
    if status is None or status.placement is None:
        return Tracking(gen, "pending", "no status from the device yet")
    refused = status.placement.refused  # the agent's own record of the last refusal, if it names gen
    if refused is not None and refused.generation == gen:
        reason: str | None = refused.reason
    else:
        reason = refusal_for(gen, status.errors, desired.published_at)
    applied = status.placement.applied_generation
    if reason is not None and (applied is None or applied < gen):
        return Tracking(gen, "refused", reason)
    if applied is not None and applied > gen:
        return Tracking(gen, "superseded", f"the device applied a newer generation {applied}")
    if applied is None or applied < gen:
        why = "device offline; it applies the retained placement when it reconnects"
        return Tracking(gen, "pending", why if not status.online else "waiting for the device")
    # applied == gen: every desired tenant must be ready on the asked backend/device.
    problems: list[str] = []
    waiting = False
    for spec in desired.tenants:
        match = [t for t in status.placement.tenants if _same_tenant(spec, t) and t.state != "draining"]
        if not match:
            problems.append(f"{spec.model}: not running on {spec.backend}:{spec.device}")
        elif match[0].state == "failed":
            problems.append(f"{spec.model}: {match[0].error or 'failed'}")
        elif match[0].state == "loading":
            waiting = True
    if problems:
        return Tracking(gen, "failed", "; ".join(problems), problems)
    if waiting:
        return Tracking(gen, "pending", "tenants loading")
    return Tracking(gen, "applied")


def next_generation(status: Status | None, desired: DesiredPlacement | None) -> int:
    """max(applied, desired) + 1, over everything known: the agent refuses older generations."""
    known = [0]
    if status is not None and status.placement is not None:
        known += [g for g in (status.placement.generation, status.placement.applied_generation) if g]
    if desired is not None:
        known.append(desired.generation)
    return max(known) + 1


def current_tenants(status: Status | None, desired: DesiredPlacement | None) -> list[TenantSpec]:
    """The tenant list an edit starts from: a still-pending desired placement, else what runs."""
    if desired is not None:
        state = track(desired, status).state
        if state in ("pending", "applied", "failed"):
            return [_resolved(t, status) for t in desired.tenants]
    if status is None or status.placement is None:
        return []
    rank = {"ready": 0, "loading": 1, "failed": 2}
    best: dict[str, TenantStatus] = {}
    for tenant in status.placement.tenants:
        if tenant.state == "draining":
            continue
        key = tenant.address or tenant.model  # two versions side by side: two tenants
        held = best.get(key)
        if held is None or rank[tenant.state] < rank[held.state]:
            best[key] = tenant
    return [t.placed() for t in best.values()]


def without_failed(tenants: list[TenantSpec], status: Status | None) -> tuple[list[TenantSpec], list[str]]:
    """`tenants` less the models whose only entry in `status` is a failed tenant, and those models.

    For edits made without a person looking at them (`edge-agent place --model`): a model that never
    started is left out rather than retried on every edit. A failed move is not affected: the tenant
    still serving that model is kept.
    """
    if status is None or status.placement is None:
        return tenants, []
    serving = {t.model for t in status.placement.tenants if t.state in ("ready", "loading")}
    failed = {t.model for t in status.placement.tenants if t.state == "failed"} - serving
    return [t for t in tenants if t.model not in failed], sorted(failed)


def _device_match(devices: list[str], wanted: str) -> str | None:
    """The device as the backend names it (case-insensitive match), or None."""
    for device in devices:
        if device.lower() == wanted.lower():
            return device
    return None


def check_against(caps: Capabilities | None, tenants: list[TenantSpec]) -> list[TenantSpec]:
    """Refuse what the device cannot run, per its own reported capabilities."""
    if caps is None:
        raise PlacementInvalid("the device has not reported its capabilities yet")
    out: list[TenantSpec] = []
    for spec in tenants:
        if caps.models and spec.model not in caps.models:
            raise PlacementInvalid(
                f"model {spec.model!r} is not on this device (has: {', '.join(caps.models)})"
            )
        if spec.backend == AUTO:
            out.append(spec)
            continue
        backend = caps.backends.get(spec.backend)
        if backend is None:
            raise PlacementInvalid(f"backend {spec.backend!r} is not known on this device")
        if not backend.available:
            raise PlacementInvalid(f"backend {spec.backend!r} is unavailable: {backend.reason}")
        device = _device_match(backend.devices, spec.device)
        if device is None:
            raise PlacementInvalid(
                f"{spec.backend} has no device {spec.device!r} (has: {', '.join(backend.devices)})"
            )
        out.append(spec.model_copy(update={"device": device}))
    return out


def build(generation: int, tenants: list[TenantSpec]) -> Placement:
    """A validated placement document (one tenant per model and version, limits of the schema)."""
    return Placement.model_validate({"generation": generation, "tenants": [t.model_dump() for t in tenants]})


def auto_tenants(tenants: list[TenantSpec]) -> list[TenantSpec]:
    """Same models, instances and batching; the agent picks backend and device."""
    return [t.model_copy(update={"backend": AUTO, "device": AUTO, "candidates": None}) for t in tenants]


def move_tenants(
    tenants: list[TenantSpec],
    caps: Capabilities | None,
    model: str,
    from_backend: str,
    to_backend: str,
    to_device: str | None,
    from_device: str | None = None,
) -> list[TenantSpec] | None:
    """The tenants with `model` moved from `from_backend` to `to_backend`; None if it is not there.

    Raises PlacementInvalid when the device cannot run the target."""
    moved = False
    out: list[TenantSpec] = []
    for spec in tenants:
        if (
            spec.model == model
            and spec.backend == from_backend
            and (from_device is None or spec.device.lower() == from_device.lower())
        ):
            device = to_device
            if device is None and to_backend == AUTO:
                device = AUTO
            elif device is None:
                backend = caps.backends.get(to_backend) if caps is not None else None
                if backend is None:
                    raise PlacementInvalid(f"backend {to_backend!r} is not known on this device")
                if not backend.available or not backend.devices:
                    raise PlacementInvalid(f"backend {to_backend!r} is unavailable: {backend.reason}")
                device = backend.devices[0]
            # A move names one place: it replaces the tenant's failover candidates, if any.
            out.append(spec.model_copy(update={"backend": to_backend, "device": device, "candidates": None}))
            moved = True
        else:
            out.append(spec)
    if not moved or out == tenants:  # not there, or already where it is asked to go
        return None
    return check_against(caps, out)

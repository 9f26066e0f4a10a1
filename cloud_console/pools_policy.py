"""Pool scaling policy (docs/pools.md, "Automatic scaling"): pure, pool figures in, one decision out.

A pool is behind when its members are saturated (every member busy, or frames answered with an
error) or serve less than the target while one is busy; it has spare capacity when the members but
one could carry what it serves at `spare_fraction` of their measured capacity. Either must hold for a
while (`up_after_s`, `down_after_s`, the hysteresis) and no change may follow another within
`cooldown_s` (a new member needs time to load and join before the figures show it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class MemberFigures:
    device_id: str
    fps: float  # frames answered with a result per second, over the last window
    error_fps: float = 0.0  # frames answered with an error per second (overloaded, ...)
    busy: bool = False  # its queue is at least half full


@dataclass(frozen=True)
class Target:
    """What a pool should do, set per pool on the pools page or PUT /api/pools/<pool>."""

    fps: float | None = None  # frames per second the pool must serve; None: whatever is sent
    min_members: int = 1
    max_members: int = 8
    up_after_s: float = 3.0
    down_after_s: float = 30.0
    cooldown_s: float = 10.0
    spare_fraction: float = 0.6  # remove a member when the others would run at most this loaded


@dataclass(frozen=True)
class ScaleState:
    """What the policy remembers between calls."""

    behind_since: float | None = None
    spare_since: float | None = None
    last_change: float | None = None


@dataclass(frozen=True)
class Decision:
    action: Literal["add", "remove", "hold"]
    reason: str
    state: ScaleState
    member: str | None = None  # the member to remove


def decide(
    members: list[MemberFigures], capacity_fps: float | None, target: Target, state: ScaleState, now: float
) -> Decision:
    """`capacity_fps`: what one member served at most while busy (None: never measured)."""
    n = len(members)
    served = sum(m.fps for m in members)
    errors = sum(m.error_fps for m in members)
    saturated = n > 0 and (errors >= 0.5 or all(m.busy for m in members))
    short = target.fps is not None and served < 0.9 * target.fps and any(m.busy for m in members)
    behind = n < target.min_members or saturated or short
    rest = capacity_fps * (n - 1) * target.spare_fraction if capacity_fps else 0.0
    spare = (
        n > target.min_members
        and not behind
        and errors == 0
        and not any(m.busy for m in members)
        and capacity_fps is not None
        and served <= rest
        and (target.fps is None or target.fps <= rest)
    )
    state = replace(
        state,
        behind_since=(state.behind_since if state.behind_since is not None else now) if behind else None,
        spare_since=(state.spare_since if state.spare_since is not None else now) if spare else None,
    )
    figures = f"{served:.1f} fps from {n} member(s)"
    if state.last_change is not None and now - state.last_change < target.cooldown_s:
        return Decision("hold", f"cooling down after the last change; {figures}", state)
    if behind and state.behind_since is not None and now - state.behind_since >= target.up_after_s:
        if n >= target.max_members:
            return Decision("hold", f"behind, but at max_members ({target.max_members}); {figures}", state)
        why = "fewer members than min_members" if n < target.min_members else _why_behind(saturated, errors)
        return Decision("add", f"{why}; {figures}", _changed(state, now))
    if spare and state.spare_since is not None and now - state.spare_since >= target.down_after_s:
        member = min(members, key=lambda m: (m.fps, m.device_id)).device_id
        why = (
            f"the other members would run at most {target.spare_fraction:.0%} of {capacity_fps:.1f} fps each"
        )
        return Decision("remove", f"{why}; {figures}", _changed(state, now), member)
    if behind:
        return Decision("hold", f"behind for {now - (state.behind_since or now):.0f} s; {figures}", state)
    if spare:
        return Decision("hold", f"spare for {now - (state.spare_since or now):.0f} s; {figures}", state)
    return Decision("hold", f"within target; {figures}", state)


def _why_behind(saturated: bool, errors: float) -> str:
    if errors >= 0.5:
        return f"{errors:.1f} frames/s answered with errors"
    if saturated:
        return "every member busy"
    return "serving under the target while a member is busy"


def _changed(state: ScaleState, now: float) -> ScaleState:
    return ScaleState(behind_since=None, spare_since=None, last_change=now)

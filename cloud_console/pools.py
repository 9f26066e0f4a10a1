"""The console's view of device pools (docs/pools.md): members' announcements on
`<prefix>/pool/+/members` turned into per-member and per-pool figures (frames per second, each
member's share, latency, queue fill) and one member's measured capacity."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from agent.protocol.pools import MEMBER_TTL_S, PoolMemberState
from cloud_console.pools_policy import MemberFigures

WINDOW_S = 10.0  # rates are taken over the announcements of this long (members announce every second)


@dataclass
class _Sample:
    at: float
    served: int
    errors: int
    latency_ms_sum: float


@dataclass
class Member:
    state: PoolMemberState
    seen: float
    samples: deque[_Sample] = field(default_factory=lambda: deque(maxlen=64))

    def rates(self) -> tuple[float, float, float | None]:
        """(results/s, errors/s, mean latency ms) over the window; a restart (counters going back)
        starts the window again."""
        if len(self.samples) < 2:
            return 0.0, 0.0, None
        first, last = self.samples[0], self.samples[-1]
        dt = last.at - first.at
        if dt <= 0:
            return 0.0, 0.0, None
        served = last.served - first.served
        latency = (last.latency_ms_sum - first.latency_ms_sum) / served if served > 0 else None
        return served / dt, (last.errors - first.errors) / dt, latency


class PoolView:
    """Event-loop only: fed by the console's MQTT dispatch."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self.members: dict[tuple[str, str, str], Member] = {}  # (pool, model, device) -> member
        self.capacity: dict[tuple[str, str], float] = {}  # (pool, model) -> most fps one busy member served
        self.bad = 0

    def on_announcement(self, payload: bytes) -> None:
        try:
            state = PoolMemberState.model_validate_json(payload)
        except ValidationError:
            self.bad += 1
            return
        now = self._clock()
        key = (state.pool, state.model, state.device_id)
        member = self.members.get(key)
        if member is None:
            member = self.members[key] = Member(state, now)
        sample = _Sample(now, state.served, state.errors, state.latency_ms_sum)
        if member.samples and sample.served < member.samples[-1].served:
            member.samples.clear()  # the member restarted
        member.samples.append(sample)
        while member.samples and now - member.samples[0].at > WINDOW_S:
            member.samples.popleft()
        member.state, member.seen = state, now
        fps, _errors, _latency = member.rates()
        if state.busy and fps > self.capacity.get((state.pool, state.model), 0.0):
            self.capacity[(state.pool, state.model)] = fps

    def live(self, pool: str, model: str) -> list[Member]:
        """The members heard from recently (a member silent for MEMBER_TTL_S is gone)."""
        now = self._clock()
        for key in [k for k, m in self.members.items() if now - m.seen > 4 * MEMBER_TTL_S]:
            del self.members[key]  # long gone: forget
        return sorted(
            (
                m
                for (p, mo, _d), m in self.members.items()
                if (p, mo) == (pool, model) and now - m.seen <= MEMBER_TTL_S
            ),
            key=lambda m: m.state.device_id,
        )

    def pools(self) -> list[tuple[str, str]]:
        return sorted({(p, m) for p, m, _d in self.members})

    def figures(self, pool: str, model: str) -> list[MemberFigures]:
        out = []
        for m in self.live(pool, model):
            fps, errors, _latency = m.rates()
            out.append(MemberFigures(m.state.device_id, fps, errors, m.state.busy))
        return out

    def summary(self, pool: str, model: str) -> dict[str, Any]:
        """A pool as the API and the page show it."""
        rows: list[dict[str, Any]] = []
        total = errors_total = weighted = 0.0
        for m in self.live(pool, model):
            fps, errors, latency = m.rates()
            total += fps
            errors_total += errors
            weighted += fps * latency if latency is not None else 0.0
            s = m.state
            rows.append(
                {
                    "device_id": s.device_id,
                    "open": s.open,
                    "busy": s.busy,
                    "queued": s.queued,
                    "depth": s.depth,
                    "fps": round(fps, 2),
                    "error_fps": round(errors, 2),
                    "latency_ms": round(latency, 1) if latency is not None else None,
                    "left": s.left,
                }
            )
        for row in rows:
            row["share"] = round(row["fps"] / total, 3) if total > 0 else None
        return {
            "pool": pool,
            "model": model,
            "members": rows,
            "fps": round(total, 2),
            "error_fps": round(errors_total, 2),
            "latency_ms": round(weighted / total, 1) if total > 0 else None,
            "capacity_fps": round(self.capacity[(pool, model)], 2)
            if (pool, model) in self.capacity
            else None,
        }

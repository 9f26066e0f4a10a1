"""A tenant's side of failover: the signs that its candidate is unhealthy (docs/reliability.md).

A tenant with other candidates is given a `FailoverSettings` before it starts; its `FailoverWatch`
counts runtime errors in a row, keeps the latency baseline for a slow drift and remembers when the
fault began. What happens then (which candidate next, the relay) is decided by the placement's
failover mover, told through `on_unhealthy`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.frames.health import DriftWatch, Relay

if TYPE_CHECKING:
    from agent.frames.tenant import Tenant

# (tenant, kind: "stall" | "error" | "drift", why) -> where its frames go now, or None (no failover)
UnhealthyFn = Callable[["Tenant", str, str], Relay | None]


@dataclass(frozen=True)
class FailoverSettings:
    """How a tenant that can move notices it should (agent.toml [failover])."""

    on_unhealthy: UnhealthyFn
    errors_to_fail: int = 0  # runtime errors in a row that make the candidate unhealthy; 0: never
    stall_timeout_s: float | None = None  # a shorter stall deadline where it can move
    drift_factor: float = 0.0  # 0: no drift check
    drift: DriftWatch | None = None  # a watch of its own (tests); else one from drift_factor


class FailoverWatch:
    """The signs of one tenant (thread-safe); without settings it never reports anything."""

    def __init__(self, settings: FailoverSettings | None = None) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._errors_in_row = 0
        self.fault_since: float | None = None  # when the fault behind the last report began
        drift = None
        if settings is not None:
            drift = settings.drift
            if drift is None and settings.drift_factor > 0:
                drift = DriftWatch(settings.drift_factor)
        self._drift = drift

    @property
    def can_move(self) -> bool:
        return self.settings is not None

    def stall_timeout(self, timeout_s: float) -> float:
        limit = self.settings.stall_timeout_s if self.settings is not None else None
        return timeout_s if limit is None else min(timeout_s, limit)

    def stalled_since(self, since: float) -> None:
        self.fault_since = since  # the hung call began then

    def runtime_error(self, message: str) -> str | None:
        """One more failed call in a row: the reason to report once there are enough, else None."""
        needed = self.settings.errors_to_fail if self.settings is not None else 0
        with self._lock:
            self._errors_in_row += 1
            if self._errors_in_row == 1:
                self.fault_since = time.monotonic()
            enough = 0 < needed <= self._errors_in_row
        return f"{needed} runtime errors in a row, the last: {message}" if enough else None

    def served(self, per_frame_ms: float) -> str | None:
        """A batch served: the error streak ends; the reason to report a slow drift (once), else None."""
        with self._lock:
            self._errors_in_row = 0
        drift = self._drift  # another worker may clear it (a drift reported) meanwhile
        if drift is None:
            return None
        recent = drift.add(per_frame_ms)
        baseline = drift.baseline_ms
        if recent is None or baseline is None:
            return None
        with self._lock:
            if self._drift is None:
                return None
            self._drift = None  # reported once per tenant
        return f"inference {recent:.1f} ms per frame against a baseline of {baseline:.1f} ms"

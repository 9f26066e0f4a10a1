"""The fleet as the console sees it: one record per device id, built only from MQTT messages.

Kept in memory (the pages and the API read it without touching SQLite); the store keeps history.
Per-device summaries are cached and rebuilt only when that device sends something, so a fleet page
of 500 devices costs a dict copy per row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agent.protocol.editing import DesiredPlacement, current_tenants, next_generation, track
from agent.protocol.schemas import Capabilities, PlacementStatus, Status, Telemetry, TenantSpec

SORT_KEYS = {
    "device_id",
    "online",
    "last_seen",
    "fps",
    "p95_ms",
    "queue_depth",
    "drops",
    "errors",
    "status_errors",
    "applied_generation",
}


def _candidates(tenant: Any) -> dict[str, Any]:
    """A tenant's failover candidates (docs/protocol.md): in order, the one serving, whether that is
    the preferred (first) one, and its recent moves. Empty for a tenant without candidates."""
    candidates = getattr(tenant, "candidates", None)
    if not candidates:
        return {}
    serving, first = getattr(tenant, "serving", None), candidates[0]
    # The serving device is named as its backend names it (`usb` placed is `usb:0` serving).
    on_first = serving is None or (
        serving.backend == first.backend
        and serving.device.lower() in (first.device.lower(), f"{first.device.lower()}:0")
    )
    return {
        "candidates": [c.label for c in candidates],
        "serving": serving.label if serving is not None else None,
        "preferred": on_first,
        "failovers": [m.model_dump(by_alias=True) for m in getattr(tenant, "failovers", [])],
    }


@dataclass
class Device:
    device_id: str
    first_seen: float
    last_seen: float
    status: Status | None = None
    # Last known capabilities and placement: kept while the device is offline, for display.
    capabilities: Capabilities | None = None
    placement: PlacementStatus | None = None
    telemetry: Telemetry | None = None
    telemetry_at: float | None = None
    desired: DesiredPlacement | None = None
    seq: int = 0  # bumped on every change: pages drop a view older than the one they show
    _summary: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def online(self) -> bool:
        return self.status is not None and self.status.online

    def touch(self) -> None:
        self.seq += 1
        self._summary = None

    def effective_status(self) -> Status | None:
        """The status with the last known capabilities and placement filled in when offline."""
        if self.status is None:
            return None
        if self.status.placement is None or self.status.capabilities is None:
            return self.status.model_copy(
                update={
                    "placement": self.status.placement or self.placement,
                    "capabilities": self.status.capabilities or self.capabilities,
                }
            )
        return self.status

    def tracking(self) -> dict[str, object]:
        return track(self.desired, self.effective_status()).as_dict()

    def editable_tenants(self) -> list[TenantSpec]:
        return current_tenants(self.effective_status(), self.desired)

    def next_generation(self) -> int:
        return next_generation(self.effective_status(), self.desired)

    def _tenant_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        telemetry = list(self.telemetry.tenants) if self.telemetry is not None else []
        placement = self.status.placement if self.status and self.status.placement else self.placement
        for tenant in placement.tenants if placement is not None else []:
            key = tenant.address or tenant.tenant_key()  # two versions of one model: two rows
            row: dict[str, Any] = {
                "model": key,
                "version": tenant.serving_version or tenant.version,
                "backend": tenant.backend,
                "device": tenant.device,
                "instances": tenant.instances,
                "state": tenant.state,
                "error": tenant.error,
                "fps": None,
                "p95_ms": None,
                "queue_depth": None,
                "drops": None,
                "errors": None,
                **_candidates(tenant),
            }
            for t in telemetry:
                if (
                    t.model == key
                    and t.backend == tenant.backend
                    and t.device.lower() == tenant.device.lower()
                    and tenant.state != "draining"
                ):
                    row.update(
                        fps=t.fps,
                        p95_ms=t.latency_ms.p95,
                        queue_depth=t.queue_depth,
                        drops=t.drops,
                        errors=t.errors,
                    )
                    telemetry.remove(t)
                    break
            rows.append(row)
        if placement is not None:
            # The status says what runs; a telemetry tenant it does not list is from before the
            # latest placement (or ahead of a status still on its way): not shown as a tenant.
            return rows
        for t in telemetry:  # no status yet: telemetry is all there is
            rows.append(
                {
                    "model": t.model,
                    "version": t.version,
                    "backend": t.backend,
                    "device": t.device,
                    "instances": t.instances,
                    "state": t.state,
                    "error": None,
                    "fps": t.fps,
                    "p95_ms": t.latency_ms.p95,
                    "queue_depth": t.queue_depth,
                    "drops": t.drops,
                    "errors": t.errors,
                }
            )
        return rows

    def summary(self, now: float, stale_after_s: float) -> dict[str, Any]:
        """One fleet-table row (cached until the device sends something)."""
        if self._summary is None:
            tenants = self._tenant_rows()
            placement = self.status.placement if self.status and self.status.placement else self.placement
            errors = self.status.errors if self.status is not None else []
            self._summary = {
                "device_id": self.device_id,
                "online": self.online,
                "agent_version": self.status.agent_version if self.status else None,
                "last_seen": self.last_seen,
                "tenants": tenants,
                "fps": round(sum(t["fps"] or 0.0 for t in tenants), 2),
                "p95_ms": max((t["p95_ms"] or 0.0 for t in tenants), default=0.0),
                "queue_depth": sum(t["queue_depth"] or 0 for t in tenants),
                "drops": sum(t["drops"] or 0 for t in tenants),
                "errors": sum(t["errors"] or 0 for t in tenants),
                "status_errors": len(errors),
                "last_error": errors[-1] if errors else None,
                "applied_generation": placement.applied_generation if placement else None,
                "placement": self.tracking(),
            }
        out = dict(self._summary)
        out["stale"] = out["online"] and now - self.last_seen > stale_after_s
        return out


class Fleet:
    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.devices: dict[str, Device] = {}

    def get_or_add(self, device_id: str, now: float | None = None) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            now = time.time() if now is None else now
            device = Device(device_id=device_id, first_seen=now, last_seen=now)
            self.devices[device_id] = device
        return device

    def summaries(
        self,
        query: str = "",
        online: bool | None = None,
        sort: str = "device_id",
        descending: bool = False,
    ) -> list[dict[str, Any]]:
        """Fleet-table rows, filtered (substring of id, model, backend, device) and sorted."""
        now = time.time()
        rows = [d.summary(now, self.stale_after_s) for d in self.devices.values()]
        if online is not None:
            rows = [r for r in rows if r["online"] == online]
        needle = query.strip().lower()
        if needle:
            rows = [r for r in rows if needle in _haystack(r)]
        key = sort if sort in SORT_KEYS else "device_id"
        rows.sort(key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0), reverse=descending)
        return rows


def _haystack(row: dict[str, Any]) -> str:
    parts = [row["device_id"]]
    for t in row["tenants"]:
        parts += [t["model"], t["backend"], t["device"], t["state"]]
    return " ".join(parts).lower()

"""The fleet as the console sees it: one record per device id, built only from MQTT messages.

Kept in memory (the pages and the API read it without touching SQLite); the store keeps history.
Per-device summaries, and the keys the table filters on, are cached and rebuilt only when that device
sends something. The fleet table is served a page at a time (`Fleet.page`): one pass over the cached
rows filters, counts and picks the page (a partial sort, not a sort of the fleet), and only the rows
of the page are copied, so a page of 100 rows at 10,000 devices costs a few milliseconds
(docs/console.md#measured-10000-devices).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Any, Literal

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
DeviceState = Literal["online", "stale", "offline"]
STATES: tuple[DeviceState, ...] = ("online", "stale", "offline")
MAX_PAGE = 1000
PLACEMENT_STATES = ("none", "pending", "applied", "failed", "refused", "superseded")
# Device tags in status (`tags`, from agent.toml), where this version of the contract has them: read
# only then (a pydantic model's missing attribute is an exception, and slow).
_STATUS_TAGS = "tags" in Status.model_fields


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
    # Marked offline by the console: it claimed online, but nothing arrived from it for the console's
    # `offline_after_s` (its broker node may be down, and a will published there never reaches us).
    silent: bool = False
    # When the console last re-published the desired placement because the device's status showed an
    # older generation (the broker node it is on never had the retained copy).
    republished_at: float = 0.0
    _summary: dict[str, Any] | None = field(default=None, repr=False)
    _keys: Keys | None = field(default=None, repr=False)

    @property
    def online(self) -> bool:
        return self.status is not None and self.status.online and not self.silent

    def touch(self, telemetry: bool = False) -> None:
        """Something changed: the row is rebuilt when next asked for. Telemetry alone changes only
        the figures, not what the table filters on (unless the tenants are known from telemetry only):
        at 2,000 messages a second the filter keys of 10,000 devices stay cached."""
        self.seq += 1
        self._summary = None
        if not telemetry or (
            (self.status is None or self.status.placement is None) and self.placement is None
        ):
            self._keys = None

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
        """One fleet-table row (a copy of the cached row, with `stale` as of `now`)."""
        out = dict(self.cached_row())
        out["stale"] = out["online"] and now - self.last_seen > stale_after_s
        return out

    def cached_row(self) -> dict[str, Any]:
        """The cached fleet-table row, rebuilt only after the device sent something."""
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
                "silent": self.silent,
                "tags": self.tags(),
                # The broker node the device is connected to (status `mqtt_broker`, docs/protocol.md).
                "broker": self.status.mqtt_broker if self.status else None,
            }
        return self._summary

    def tags(self) -> dict[str, str]:
        """The device's tags: its own (status `tags`, from agent.toml) and those the console assigned
        (`console_tags`), the console's winning. Empty where neither exists."""
        own = getattr(self.status, "tags", None) if _STATUS_TAGS and self.status is not None else None
        assigned = self.__dict__.get("console_tags")
        out: dict[str, str] = {}
        for source in (own, assigned):
            if isinstance(source, dict):
                out.update({str(k): str(v) for k, v in source.items()})
        return out

    def keys(self) -> Keys:
        """What the fleet table filters on, and its sort keys that only status changes (cached until
        the device's status or placement changes, `touch`)."""
        if self._keys is None:
            row = self.cached_row()
            models, backends, parts = set(), set(), [self.device_id]
            failover = False
            for t in row["tenants"]:
                models.add(t["model"])
                backends.add(t["backend"])
                parts += [t["model"], t["backend"], t["device"], t["state"]]
                failover = failover or t.get("preferred") is False
            tags = row["tags"]
            parts += [f"{k}:{v}" for k, v in tags.items()]
            self._keys = Keys(
                haystack=" ".join(parts).lower(),
                models=frozenset(models),
                backends=frozenset(backends),
                failover=failover,
                tags=tags,
                placement=row["placement"]["state"],
                status_errors=row["status_errors"],
                applied_generation=row["applied_generation"],
            )
        return self._keys


@dataclass(frozen=True, slots=True)
class Keys:
    haystack: str
    models: frozenset[str]
    backends: frozenset[str]
    failover: bool  # a tenant serves on a later candidate than its first (docs/protocol.md)
    tags: dict[str, str]
    placement: str  # where the console's desired placement stands (tracking state)
    status_errors: int
    applied_generation: int | None


class BadQuery(ValueError):
    """A fleet-table query the console cannot answer; the message says which part (HTTP 422)."""


@dataclass(frozen=True)
class FleetQuery:
    """One page of the fleet table: filters (all must hold), the sort, and the window.

    `q` is a substring of the id, a tenant's model, backend, device or state, or a `key:value` tag;
    `state` online (and not stale) | stale | offline; `tag` `key:value` (or `key`, any value);
    `failover` True for devices with a tenant off its first candidate."""

    q: str = ""
    device_id: str = ""  # substring of the id only
    state: str | None = None  # a DeviceState
    online: bool | None = None
    model: str | None = None
    backend: str | None = None
    tag: str | None = None
    failover: bool | None = None
    placement: str | None = None  # where its desired placement stands: a PLACEMENT_STATES entry
    sort: str = "device_id"
    desc: bool = False
    offset: int = 0
    limit: int = 100
    facets: bool = False  # also count devices per model and per backend (the page's filter choices)
    ids: frozenset[str] | None = None  # only these devices (what a selector matched, docs/fleet.md#selectors)

    def filtered(self) -> bool:
        """Whether any filter is set (else every device matches)."""
        return bool(
            self.q.strip()
            or self.device_id.strip()
            or self.tag
            or any(v is not None for v in (self.state, self.online, self.model, self.backend))
            or self.failover is not None
            or self.placement is not None
            or self.ids is not None
        )

    def check(self) -> FleetQuery:
        if self.sort not in SORT_KEYS:
            raise BadQuery(f"sort: one of {', '.join(sorted(SORT_KEYS))}")
        if self.state is not None and self.state not in STATES:
            raise BadQuery(f"state: one of {', '.join(STATES)}")
        if self.placement is not None and self.placement not in PLACEMENT_STATES:
            raise BadQuery(f"placement: one of {', '.join(PLACEMENT_STATES)}")
        if not 0 <= self.limit <= MAX_PAGE:
            raise BadQuery(f"limit: 0..{MAX_PAGE}")
        if self.offset < 0:
            raise BadQuery("offset: 0 or more")
        if self.tag is not None and not self.tag.partition(":")[0].strip():
            raise BadQuery("tag: key:value or key")
        return self


def _sort_value(device: Device, key: str) -> tuple[bool, Any]:
    """The sort key: from the device itself or its cached keys where a status change is what changes
    it; the figures telemetry brings from its (cached) row."""
    if key == "device_id":
        value: Any = device.device_id
    elif key == "online":
        value = device.online
    elif key == "last_seen":
        value = device.last_seen
    elif key in ("status_errors", "applied_generation"):
        value = getattr(device.keys(), key)
    else:
        value = device.cached_row()[key]
    return (value is None, value if value is not None else 0)


class Fleet:
    def __init__(self, stale_after_s: float, counts_max_age_s: float = 0.0) -> None:
        self.stale_after_s = stale_after_s
        self.devices: dict[str, Device] = {}
        # Fleet-wide counts are reused for this long (the console: a second, as its live events):
        # the default page then costs a slice of the ids and its own rows.
        self.counts_max_age_s = counts_max_age_s
        self._counts: tuple[float, dict[str, int]] | None = None
        # The device ids in order: the default page (no filter, by id) is a slice of it. Rebuilt when
        # a device joins (get_or_add) or leaves (the dict shrinks).
        self._ids: list[str] | None = None

    def sorted_ids(self) -> list[str]:
        if self._ids is None or len(self._ids) != len(self.devices):
            self._ids = sorted(self.devices)
        return self._ids

    def get_or_add(self, device_id: str, now: float | None = None) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            now = time.time() if now is None else now
            device = Device(device_id=device_id, first_seen=now, last_seen=now)
            self.devices[device_id] = device
            self._ids = None
        return device

    def counts(self, now: float | None = None) -> dict[str, int]:
        """Fleet-wide figures for the top of the fleet page (one pass over the cached keys, or the
        last pass if it is at most `counts_max_age_s` old)."""
        cached = self._counts
        if (
            cached is not None
            and time.monotonic() - cached[0] < self.counts_max_age_s
            and cached[1]["total"] == len(self.devices)  # (a device that joined or left: count again)
        ):
            return dict(cached[1])
        counts = self._scan(FleetQuery(), time.time() if now is None else now, collect=False)[1]
        self._counts = (time.monotonic(), counts)
        return dict(counts)

    def page(self, query: FleetQuery, now: float | None = None) -> dict[str, Any]:
        """One page of fleet-table rows, filtered and sorted, with the fleet-wide counts.

        `matched` is how many rows pass the filters; `devices` holds rows offset..offset+limit of them."""
        query.check()
        now = time.time() if now is None else now
        want = query.offset + query.limit
        if query.sort == "device_id" and not query.filtered():
            # The default page: a slice of the ids in order, and the counts (no sort, no filter).
            counts, facets = (
                self.counts(now),
                self._scan(query, now, collect=False)[2] if query.facets else {},
            )
            ids = self.sorted_ids()
            ids = ids[::-1] if query.desc else ids
            picked = [self.devices[d] for d in ids[query.offset : want] if d in self.devices]
            return self._answer(query, picked, len(self.devices), counts, facets, now)
        matched, counts, facets = self._scan(query, now)
        key = query.sort

        def order(d: Device) -> tuple[tuple[bool, Any], str]:
            return (_sort_value(d, key), d.device_id)

        if want == 0:
            window: list[Device] = []
        elif want < len(matched) // 2:  # a partial sort: the first pages of a large fleet
            pick = heapq.nlargest if query.desc else heapq.nsmallest
            window = pick(want, matched, key=order)[query.offset :]
        else:
            window = sorted(matched, key=order, reverse=query.desc)[query.offset : want]
        return self._answer(query, window, len(matched), counts, facets, now)

    def _answer(
        self,
        query: FleetQuery,
        window: list[Device],
        matched: int,
        counts: dict[str, int],
        facets: dict[str, dict[str, int]],
        now: float,
    ) -> dict[str, Any]:
        return {
            "devices": [d.summary(now, self.stale_after_s) for d in window],
            "matched": matched,
            "total": len(self.devices),
            "offset": query.offset,
            "limit": query.limit,
            "counts": counts,
            **({"facets": facets} if query.facets else {}),
        }

    def _scan(
        self, query: FleetQuery, now: float, collect: bool = True
    ) -> tuple[list[Device], dict[str, int], dict[str, dict[str, int]]]:
        """One pass: count every device, keep those that pass every filter."""
        needle = query.q.strip().lower()
        id_part = query.device_id.strip().lower()
        tag_key, has_value, tag_value = (query.tag or "").partition(":")
        tag_key, tag_value = tag_key.strip(), tag_value.strip()
        counts = dict.fromkeys(
            ("total", "online", "stale", "offline", "silent", "failover", "pending", "refused", "failed"), 0
        )
        counts["total"] = len(self.devices)
        matched: list[Device] = []
        models: dict[str, int] = {}
        backends: dict[str, int] = {}
        stale_after = self.stale_after_s
        for device in self.devices.values():
            k = device.keys()
            online = device.online
            state = "offline" if not online else "stale" if now - device.last_seen > stale_after else "online"
            counts[state] += 1
            if device.silent:
                counts["silent"] += 1
            if k.failover:
                counts["failover"] += 1
            placement_state = k.placement
            if placement_state in ("pending", "refused", "failed"):
                counts[placement_state] += 1
            if query.facets:
                for name in k.models:
                    models[name] = models.get(name, 0) + 1
                for name in k.backends:
                    backends[name] = backends.get(name, 0) + 1
            if not collect:
                continue
            if query.state is not None and state != query.state:
                continue
            if query.online is not None and online != query.online:
                continue
            if query.model is not None and query.model not in k.models:
                continue
            if query.backend is not None and query.backend not in k.backends:
                continue
            if query.failover is not None and k.failover != query.failover:
                continue
            if query.ids is not None and device.device_id not in query.ids:
                continue
            if query.placement is not None and placement_state != query.placement:
                continue
            if tag_key and (tag_key not in k.tags or (has_value and k.tags[tag_key] != tag_value)):
                continue
            if id_part and id_part not in device.device_id.lower():
                continue
            if needle and needle not in k.haystack:
                continue
            matched.append(device)
        facets = {"models": dict(sorted(models.items())), "backends": dict(sorted(backends.items()))}
        return matched, counts, facets

"""Staged rollouts, applied (docs/fleet.md#rollouts): the planner's decisions through the console's
own placement and delivery paths, persisted so that a restarted console carries on.

Twice a second the engine shows each open rollout's planner (cloud_console/rollouts.py) what the
fleet reports and publishes the placements it asks for, at most 64 at a time (QoS 1 acks in flight,
as the fleet move). A change is one placement document per device, published retained: a device
offline when its restore is published applies it when it reconnects, and never the change alone.
Every state change is written to the rollout store (cloud_console/rollout_store.py) and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from typing import Any

from pydantic import ValidationError

from agent.protocol.editing import PlacementInvalid
from agent.protocol.topics import tag_problem
from cloud_console import rollouts as planner
from cloud_console.model_store import ModelRejected
from cloud_console.mqtt import PublishFailed
from cloud_console.rollout_store import RolloutStore, SqliteRolloutStore
from cloud_console.rollouts import DeviceView, Place, Rollout, RolloutError, RolloutSpec
from cloud_console.selectors import SelectorError, merged_tags, parse
from cloud_console.service import Console, UnknownDevice

log = logging.getLogger(__name__)

TICK_S = 0.5
SAVE_EVERY_S = 5.0  # an open rollout is written at least this often (figures move between changes)
# Device-level progress is written at most this often: a record of 1,000 devices is ~0.5 MB of JSON,
# ~50 ms to serialise on the event loop. A restart loses at most this much device progress, which it
# re-derives from the devices' statuses (a publish it forgot is done again, harmlessly).
SAVE_MIN_S = 2.0
MAX_TAGS = 32
VIEWED = ("targeted", "publishing", "applying", "soaking", "rolling_back")


class RolloutEngine:
    def __init__(self, console: Console, store: RolloutStore | None = None, tick_s: float = TICK_S) -> None:
        self.console = console
        self.store: RolloutStore = store or SqliteRolloutStore(console.config.storage.db)
        self.tick_s = tick_s
        self.rollouts: dict[str, Rollout] = {}
        self.assigned: dict[str, dict[str, str]] = {}  # console-assigned tags by device id
        self.events: Counter[str] = Counter()  # timeline events by kind, for /metrics
        self.placements = Counter[str]()  # placements published, by purpose
        self._logged: dict[str, int] = {}
        self._signature: dict[str, tuple[Any, ...]] = {}
        self._counts: dict[str, tuple[Any, ...]] = {}
        self._saved_at: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._limit = asyncio.Semaphore(64)
        self._jobs: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._shared: set[str] = set()
        self._tags_changed = True

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.store.open)
        for doc in await asyncio.to_thread(self.store.load):
            try:
                rollout = Rollout.model_validate_json(doc)
            except ValidationError as exc:
                log.error("rollout store: a record that does not parse is skipped: %s", exc.errors()[:1])
                continue
            planner.restart(rollout)
            self.rollouts[rollout.id] = rollout
            self._logged[rollout.id] = len(rollout.timeline)
            if rollout.is_open():
                log.info(
                    "rollout %s resumes: %s, wave %d", rollout.id, rollout.state, rollout.current_wave + 1
                )
        self.assigned = await asyncio.to_thread(self.store.tags)
        self._task = asyncio.create_task(self._run(), name="rollouts")

    async def stop(self) -> None:
        for task in [self._task, *self._jobs]:
            if task is not None:
                task.cancel()
        for task in [self._task, *self._jobs]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._dirty.update(self.rollouts)
        await self._save(force=True)
        await asyncio.to_thread(self.store.close)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.tick(time.time())
                await self._save()
            except Exception:  # a bug here must not end rollouts for good: logged, next tick
                log.exception("rollout engine tick failed")

    # -- tags and selectors ---------------------------------------------------------------------
    def tags_of(self, device_id: str) -> dict[str, str]:
        device = self.console.fleet.devices.get(device_id)
        reported = device.status.tags if device is not None and device.status is not None else {}
        return merged_tags(reported, self.assigned.get(device_id))

    def select(self, selector: str) -> list[str]:
        """Device ids matching the selector, sorted; raises SelectorError."""
        chosen = parse(selector)
        return sorted(d for d in self.console.fleet.devices if chosen.matches(d, self.tags_of(d)))

    async def set_tags(self, device_id: str, tags: dict[str, str]) -> dict[str, str]:
        """Replace the console-assigned tags of a device ("" as a value hides a tag it reports)."""
        if len(tags) > MAX_TAGS:
            raise RolloutError(f"at most {MAX_TAGS} tags")
        for key, value in tags.items():
            problem = tag_problem(key, value or "x")
            if problem is not None:
                raise RolloutError(problem)
        await asyncio.to_thread(self.store.set_tags, device_id, tags, time.time())
        if tags:
            self.assigned[device_id] = dict(tags)
        else:
            self.assigned.pop(device_id, None)
        self._tags_changed = True
        self._share_tags()
        log.info("tags of %s set by the console: %s", device_id, tags)
        return self.tags_of(device_id)

    # -- rollouts -------------------------------------------------------------------------------
    async def create(self, spec: RolloutSpec, user: str, base_url: str = "") -> Rollout:
        try:
            targets = self.select(spec.selector)
        except SelectorError as exc:
            raise RolloutError(str(exc)) from exc
        busy = {
            d for r in self.rollouts.values() if r.state not in planner.TERMINAL_ROLLOUT for d in r.devices
        }
        clash = sorted(set(targets) & busy)
        if clash:
            raise RolloutError(f"{len(clash)} targeted devices are in another running rollout: {clash[:5]}")
        if spec.change.model is not None:  # a device that runs no such tenant is left out up front
            targets = [d for d in targets if self._runs(d, spec.change.model)]
        fleet = self.console.fleet.devices
        targets.sort(key=lambda d: (not fleet[d].online, d))  # canaries are devices that are online
        rollout = planner.create(
            f"r{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}", spec, targets, time.time(), user, base_url
        )
        self.rollouts[rollout.id] = rollout
        self._dirty.add(rollout.id)
        self._log_timeline(rollout)
        await self._save(force=True)
        return rollout

    def _runs(self, device_id: str, model: str) -> bool:
        device = self.console.fleet.devices[device_id]
        return any(t.model == model for t in device.editable_tenants())

    def get(self, rollout_id: str) -> Rollout:
        rollout = self.rollouts.get(rollout_id)
        if rollout is None:
            raise KeyError(rollout_id)
        return rollout

    async def command(self, rollout_id: str, op: str, user: str) -> Rollout:
        rollout = self.get(rollout_id)
        planner.command(rollout, op, time.time(), user)
        self._dirty.add(rollout_id)
        self._log_timeline(rollout)
        self.tick(time.time())  # act on it now, not at the next tick
        await self._save(force=True)
        return rollout

    # -- the loop -------------------------------------------------------------------------------
    def _views(self, rollout: Rollout) -> dict[str, DeviceView]:
        views: dict[str, DeviceView] = {}
        fleet = self.console.fleet.devices
        for device_id, rec in rollout.devices.items():
            device = fleet.get(device_id)
            if device is None or rec.state not in VIEWED:
                continue
            starting = rec.state == "targeted" and device.online
            caps = device.capabilities
            views[device_id] = DeviceView(
                online=device.online,
                status=device.effective_status(),
                telemetry=device.telemetry,
                telemetry_at=device.telemetry_at,
                tenants=device.editable_tenants() if starting else None,
                installed=(
                    {m.name: [v.version for v in m.versions] for m in caps.installed}
                    if starting and caps is not None
                    else None
                ),
            )
        return views

    def _share_tags(self) -> None:
        """The fleet table shows and filters by tags (cloud_console/fleet.py reads `console_tags`)."""
        fleet = self.console.fleet.devices
        for device_id, device in fleet.items():
            tags = self.assigned.get(device_id)
            if device.__dict__.get("console_tags") != tags:
                setattr(device, "console_tags", tags)  # noqa: B010 - an attribute the fleet reads if set
                device.touch()

    def tick(self, now: float) -> None:
        if len(self._shared) != len(self.console.fleet.devices) or self._tags_changed:
            self._share_tags()
            self._shared = set(self.console.fleet.devices)
            self._tags_changed = False
        for rollout in list(self.rollouts.values()):
            if not rollout.is_open():
                continue
            actions = planner.step(rollout, self._views(rollout), now)
            for action in actions:
                job = asyncio.create_task(self._place(rollout, action), name=f"rollout-{action.device_id}")
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
            self._log_timeline(rollout)
            major = (rollout.state, rollout.current_wave, tuple(w.state for w in rollout.waves))
            counts = tuple(sorted(rollout.counts().items()))
            since = now - self._saved_at.get(rollout.id, 0.0)
            if major != self._signature.get(rollout.id):  # a wave or the rollout moved: at once
                self._signature[rollout.id] = major
                self._dirty.add(rollout.id)
            elif (counts != self._counts.get(rollout.id) and since >= SAVE_MIN_S) or since > SAVE_EVERY_S:
                self._counts[rollout.id] = counts
                self._dirty.add(rollout.id)

    async def _place(self, rollout: Rollout, action: Place) -> None:
        user = f"rollout {rollout.id}"
        async with self._limit:
            try:
                if action.purpose == "forward":
                    base = rollout.base_url or self.console.config.public_url or ""
                    if base:  # a version the device lacks is delivered first (docs/fleet.md)
                        await self.console.deliver_missing(action.device_id, action.tenants, base, user)
                    doc, _ = await self.console.publish_placement(
                        action.device_id, action.tenants, user, "rollout"
                    )
                else:  # the placement it had: published as it was, not re-checked
                    doc, _ = await self.console.publish_placement(
                        action.device_id, action.tenants, user, "rollback", check=False
                    )
            except (PlacementInvalid, PublishFailed, UnknownDevice, ModelRejected, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                log.warning(
                    "rollout %s: %s to %s failed: %s", rollout.id, action.purpose, action.device_id, reason
                )
                planner.publish_failed(rollout, action.device_id, action.purpose, reason, time.time())
            else:
                self.placements[action.purpose] += 1
                planner.published(rollout, action.device_id, action.purpose, doc.generation, time.time())

    def _log_timeline(self, rollout: Rollout) -> None:
        start = self._logged.get(rollout.id, 0)
        for event in rollout.timeline[start:]:
            self.events[event.kind] += 1
            level = (
                logging.WARNING
                if event.kind in ("wave_failed", "device_failed", "rollback_failed")
                else logging.INFO
            )
            log.log(level, "rollout %s: %s", rollout.id, event.message)
        self._logged[rollout.id] = len(rollout.timeline)

    async def _save(self, *, force: bool = False) -> None:
        dirty, self._dirty = self._dirty, set()
        now = time.time()
        for rollout_id in sorted(dirty):
            rollout = self.rollouts.get(rollout_id)
            if rollout is None:
                continue
            document = rollout.model_dump_json(exclude_defaults=True)
            try:
                await asyncio.to_thread(
                    self.store.save, rollout.id, rollout.state, rollout.created_at, now, document
                )
            except Exception:  # the disk: kept dirty, tried again next tick
                log.exception("rollout %s could not be saved", rollout_id)
                self._dirty.add(rollout_id)
                continue
            self._saved_at[rollout_id] = now

    # -- views ----------------------------------------------------------------------------------
    def summary(self, rollout: Rollout) -> dict[str, Any]:
        return {
            "id": rollout.id,
            "name": rollout.spec.name,
            "selector": rollout.spec.selector,
            "change": rollout.spec.change.model_dump(mode="json", exclude_none=True),
            "state": rollout.state,
            "reason": rollout.reason,
            "created_at": rollout.created_at,
            "created_by": rollout.created_by,
            "current_wave": rollout.current_wave,
            "waves": len(rollout.waves),
            "devices": len(rollout.devices),
            "counts": rollout.counts(),
            "failed_at": rollout.failed_at,
            "rolled_back_at": rollout.rolled_back_at,
            "finished_at": rollout.finished_at,
        }

    def detail(self, rollout: Rollout) -> dict[str, Any]:
        """The summary, the spec, each wave with its devices and the timeline."""
        waves = []
        for wave in rollout.waves:
            devices = []
            for device_id in wave.devices:
                rec = rollout.devices[device_id]
                devices.append(
                    {
                        "device_id": device_id,
                        "state": rec.state,
                        "reason": rec.reason,
                        "deferred": rec.deferred,
                        "generation": rec.generation,
                        "rollback_generation": rec.rollback_generation,
                        "figures": rec.figures,
                        "before": [
                            t.model_dump(mode="json", exclude_defaults=True) for t in rec.before or []
                        ],
                    }
                )
            waves.append({**wave.model_dump(mode="json", exclude={"devices"}), "devices": devices})
        return {
            **self.summary(rollout),
            "spec": rollout.spec.model_dump(mode="json", exclude_none=True),
            "wave_list": waves,
            "timeline": [e.model_dump(mode="json", exclude_none=True) for e in rollout.timeline],
            "events_dropped": rollout.events_dropped,
        }

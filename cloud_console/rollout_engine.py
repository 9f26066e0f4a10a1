"""Staged rollouts, applied (docs/fleet.md#rollouts): the planner's decisions through the console's
own placement and delivery paths, persisted so that a restarted console carries on.

Twice a second the engine shows each open rollout's planner (cloud_console/rollouts.py) what the
fleet reports and publishes the placements it asks for, at most 64 at a time (QoS 1 acks in flight,
as the fleet move). A change is one placement document per device, published retained: a device
offline when its restore is published applies it when it reconnects, and never the change alone.
Every state change is written to the rollout store (cloud_console/rollout_store.py) and logged.

Several console processes on one database: each reads what changed in the store every tick (a
rollout created, paused or aborted through any process; tags), but only the holder of the lease
`rollouts` steps rollouts and publishes. A step's records are written before its placements go out
(a process taking over after the holder died knows what was on its way, and publishes it again),
and a publish is skipped once the lease may have passed to another process. A write that finds the
row changed by another process is refused; the record is read again and stepped from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError

from agent.protocol.editing import PlacementInvalid
from agent.protocol.topics import tag_problem
from cloud_console import rollouts as planner
from cloud_console.db import Lease
from cloud_console.model_store import ModelRejected
from cloud_console.mqtt import PublishFailed
from cloud_console.rollout_store import RolloutStore
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
# The holder renews the lease every tick; a holder that died is taken over this long after.
LEASE_TTL_S = 15.0
VIEWED = ("targeted", "publishing", "applying", "soaking", "rolling_back")


class RolloutEngine:
    def __init__(
        self,
        console: Console,
        store: RolloutStore | None = None,
        tick_s: float = TICK_S,
        lease: Lease | None = None,
    ) -> None:
        self.console = console
        self.store = store or RolloutStore(console.engine)
        self.lease = lease or Lease(console.engine, "rollouts", ttl_s=LEASE_TTL_S)
        self.holding = False  # this process steps rollouts (it held the lease at the last turn)
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
        self._revision: dict[str, int] = {}  # the stored revision each rollout in memory was read at
        self._in_flight: set[tuple[str, str]] = set()  # (rollout, device): a publish of this process
        # A turn and a command of this process never interleave (a command's write and a step's
        # write of one record would each think the other's revision theirs).
        self._turning = asyncio.Lock()
        self._tags_version: str | None = "unread"

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.create_task(self._run(), name="rollouts")

    async def stop(self) -> None:
        for task in [self._task, *self._jobs]:
            if task is not None:
                task.cancel()
        for task in [self._task, *self._jobs]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.holding:  # what moved since the last write, then another process may take over
            self._dirty.update(r.id for r in self.rollouts.values() if r.is_open())
            await self._save()
            await asyncio.to_thread(self.lease.release)
        self.holding = False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.turn(time.time())
            except Exception:  # a bug here must not end rollouts for good: logged, next tick
                log.exception("rollout engine tick failed")

    async def turn(self, now: float) -> None:
        """One tick: take or renew the lease, read what changed in the store, step if held."""
        async with self._turning:
            await self._turn(now)

    async def _turn(self, now: float) -> None:
        held = await asyncio.to_thread(self.lease.held)
        if self.holding and not held:
            self._let_go()
        try:
            await self.sync()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("rollouts: database unavailable (%s)", exc)
            return
        if len(self._shared) != len(self.console.fleet.devices) or self._tags_changed:
            self._share_tags()
            self._shared = set(self.console.fleet.devices)
            self._tags_changed = False
        if held:
            if not self.holding:
                self._take_over()
            await self._step(now)
        # With a shared group this process gets a share of the telemetry only: the devices it judges
        # are followed live (every message).
        self.console.followed = {
            d
            for r in (self.rollouts.values() if self.holding else ())
            if r.is_open()
            for d, rec in r.devices.items()
            if rec.state in VIEWED
        }

    def _take_over(self) -> None:
        """The lease is this process's now: carry on from the stored records."""
        self.holding = True
        for rollout in self.rollouts.values():
            planner.restart(rollout)  # nothing of this process is in flight: the last holder's was
            if rollout.is_open():
                log.info(
                    "rollout %s resumes here: %s, wave %d",
                    rollout.id,
                    rollout.state,
                    rollout.current_wave + 1,
                )

    def _let_go(self) -> None:
        """The lease was lost (the database unreachable, or this process stalled past its TTL):
        nothing more is published here, and every record is read again from the store."""
        log.warning("rollouts: lease lost; this process stops stepping them")
        self.holding = False
        for job in self._jobs:
            job.cancel()
        self._dirty.clear()
        self._revision.clear()

    async def sync(self) -> None:
        """Read the rollouts another process wrote (and this one has not), and every tag."""
        revisions, tags_version = await asyncio.to_thread(self.store.revisions)
        changed = [i for i, rev in revisions.items() if self._revision.get(i) != rev]
        if changed:
            for rollout_id, revision, rollout in await asyncio.to_thread(self._read, changed):
                self._revision[rollout_id] = revision
                if rollout is not None:
                    self._adopt(rollout, revision)
        if tags_version != self._tags_version:
            self.assigned = await asyncio.to_thread(self.store.tags)
            self._tags_version = tags_version
            self._tags_changed = True

    def _read(self, ids: list[str]) -> list[tuple[str, int, Rollout | None]]:
        """The stored records, parsed (on a thread: a fleet-size record is ~0.5 MB of JSON)."""
        out: list[tuple[str, int, Rollout | None]] = []
        for row in self.store.read(ids):
            try:
                out.append((row.id, row.revision, Rollout.model_validate_json(row.document)))
            except ValidationError as exc:
                log.error("rollout store: record %s does not parse; skipped: %s", row.id, exc.errors()[:1])
                out.append((row.id, row.revision, None))
        return out

    def _adopt(self, rollout: Rollout, revision: int) -> None:
        """The stored record replaces the one in memory (what this process had not written yet is
        redone from the devices' reports, as after a restart)."""
        if self.holding:
            planner.restart(rollout, {d for r, d in self._in_flight if r == rollout.id})
        self.rollouts[rollout.id] = rollout
        self._revision[rollout.id] = revision
        self._logged[rollout.id] = len(rollout.timeline)
        self._dirty.discard(rollout.id)

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
        document = rollout.model_dump_json(exclude_defaults=True)
        revision = await asyncio.to_thread(
            self.store.insert, rollout.id, rollout.state, rollout.created_at, document
        )
        self.rollouts[rollout.id] = rollout  # stepped by the lease holder, this process or another
        self._revision[rollout.id] = revision
        self._log_timeline(rollout)
        return rollout

    def _runs(self, device_id: str, model: str) -> bool:
        device = self.console.fleet.devices[device_id]
        return any(t.model == model for t in device.editable_tenants())

    def get(self, rollout_id: str) -> Rollout:
        rollout = self.rollouts.get(rollout_id)
        if rollout is None:
            raise KeyError(rollout_id)
        return rollout

    async def find(self, rollout_id: str) -> Rollout:
        """The rollout, also one another process created since this one's last tick; KeyError."""
        if rollout_id not in self.rollouts:
            async with self._turning:
                await self.sync()
        return self.get(rollout_id)

    async def command(self, rollout_id: str, op: str, user: str) -> Rollout:
        """Pause, resume, ... on the stored record (any process may take it); the lease holder acts
        on it now, another process at its next tick."""
        async with self._turning:
            return await self._command(rollout_id, op, user)

    async def _command(self, rollout_id: str, op: str, user: str) -> Rollout:
        for _ in range(5):
            if self.holding:
                rollout, revision = self.get(rollout_id), self._revision.get(rollout_id, 0)
            else:  # the copy here may be a tick old: the stored one
                found = await asyncio.to_thread(self._read, [rollout_id])
                fresh = found[0][2] if found else None
                if fresh is None:
                    raise KeyError(rollout_id)
                rollout, revision = fresh, found[0][1]
            planner.command(rollout, op, time.time(), user)
            document = rollout.model_dump_json(exclude_defaults=True)
            saved = await asyncio.to_thread(self.store.save, rollout_id, rollout.state, document, revision)
            if saved is None:  # another process wrote it meanwhile: again, on what it wrote
                self._revision.pop(rollout_id, None)
                await self.sync()
                continue
            self.rollouts[rollout_id] = rollout
            self._revision[rollout_id] = saved
            self._dirty.discard(rollout_id)
            self._log_timeline(rollout)
            if self.holding and self.lease.still_held():
                await self._step(time.time())  # act on it now, not at the next tick
            return rollout
        raise RolloutError("the rollout kept changing meanwhile: try again")

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

    async def _step(self, now: float) -> None:
        """Step every open rollout, write what moved, then publish what the written records say is
        on its way (a record that could not be written is read again, and its step redone)."""
        actions = self.tick(now)
        saved = await self._save()
        for rollout_id, action in actions:
            if rollout_id not in saved:
                self._revision.pop(rollout_id, None)
                continue
            self._in_flight.add((rollout_id, action.device_id))
            job = asyncio.create_task(self._place(rollout_id, action), name=f"rollout-{action.device_id}")
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)

    def tick(self, now: float) -> list[tuple[str, Place]]:
        """The planner's step of every open rollout; the placements it asks for (not yet out)."""
        out: list[tuple[str, Place]] = []
        for rollout in list(self.rollouts.values()):
            if not rollout.is_open():
                continue
            actions = planner.step(rollout, self._views(rollout), now)
            if actions:
                self._dirty.add(rollout.id)
                out.extend((rollout.id, action) for action in actions)
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
        return out

    async def _place(self, rollout_id: str, action: Place) -> None:
        try:
            await self._publish(rollout_id, action)
        finally:
            self._in_flight.discard((rollout_id, action.device_id))

    def _skipped(self, rollout_id: str) -> None:
        """Not published: the lease may be another process's by now (this one stalled). The stored
        record (it says the publish is on its way) is read again; whoever holds the lease then
        publishes it."""
        log.warning("rollout %s: lease not renewed in time, a placement is left to the holder", rollout_id)
        self._revision.pop(rollout_id, None)

    async def _publish(self, rollout_id: str, action: Place) -> None:
        user = f"rollout {rollout_id}"
        async with self._limit:
            if not self.lease.still_held():
                self._skipped(rollout_id)
                return
            try:
                if action.purpose == "forward":
                    base = self.get(rollout_id).base_url or self.console.config.public_url or ""
                    if base:  # a version the device lacks is delivered first (docs/fleet.md)
                        await self.console.deliver_missing(action.device_id, action.tenants, base, user)
                    if not self.lease.still_held():
                        self._skipped(rollout_id)
                        return
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
                    "rollout %s: %s to %s failed: %s", rollout_id, action.purpose, action.device_id, reason
                )
                rollout = self.rollouts.get(rollout_id)  # the record now (it may have been read again)
                if rollout is not None and self.holding:
                    planner.publish_failed(rollout, action.device_id, action.purpose, reason, time.time())
            else:
                self.placements[action.purpose] += 1
                rollout = self.rollouts.get(rollout_id)
                if rollout is not None and self.holding:
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

    async def _save(self) -> set[str]:
        """Write the rollouts that moved (compare and swap on their revision); the ids written."""
        dirty, self._dirty = self._dirty, set()
        saved: set[str] = set()
        now = time.time()
        for rollout_id in sorted(dirty):
            rollout = self.rollouts.get(rollout_id)
            revision = self._revision.get(rollout_id)
            if rollout is None or revision is None:
                continue
            document = rollout.model_dump_json(exclude_defaults=True)
            try:
                new = await asyncio.to_thread(self.store.save, rollout.id, rollout.state, document, revision)
            except sa.exc.SQLAlchemyError as exc:  # kept dirty, tried again next tick
                log.warning("rollout %s could not be saved: %s", rollout_id, exc)
                self._dirty.add(rollout_id)
                continue
            if new is None:  # written by another process meanwhile: read again at the next tick
                log.info("rollout %s was changed by another process: read again", rollout_id)
                self._revision.pop(rollout_id, None)
                continue
            self._revision[rollout_id] = new
            self._saved_at[rollout_id] = now
            saved.add(rollout_id)
        return saved

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

"""Automatic pool scaling (docs/pools.md, "Automatic scaling"): applies the pure policy of
cloud_console/pools_policy.py through the console's placement path.

Adding a member: the least loaded online device that is not a member and has the model (or gets it
from the model store first, `deliver_missing`) gets the pool's tenant, copied from a member's;
the pool counts it once it announces itself in the share (make-before-break: nothing is removed
meanwhile). Removing one: the member the policy names loses the pool (or the tenant, when the scaler
placed it); the others already carry the load, and frames that reach it while it goes are handed back
to the pool by the agent.

Targets are rows of the console's database (table `pool_targets`), read again every tick, so a
target set through any console process counts. Scaling itself runs in one process at a time: the
holder of the lease `pools`. Another process that takes the lease over (its holder died) starts
each pool's timers afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from agent.protocol.editing import PlacementInvalid
from agent.protocol.schemas import TenantSpec
from agent.protocol.topics import parse_pool_topic, pool_filter
from cloud_console.db import Lease, pool_targets, upsert
from cloud_console.mqtt import PublishFailed
from cloud_console.pools import PoolView
from cloud_console.pools_policy import Decision, ScaleState, Target, decide
from cloud_console.service import Console

log = logging.getLogger(__name__)

TICK_S = 1.0
JOIN_TIMEOUT_S = 300.0  # an added member that has not joined by then is given up on
USER = "pool-scaler"
LEASE_TTL_S = 15.0  # renewed every tick: a holder that died is taken over this long after

Key = tuple[str, str]  # (pool, model)


@dataclass
class Pending:
    device_id: str
    since: float


class LeaseLost(Exception):
    """The lease `pools` may be another process's by now: nothing is published here."""


class PoolScaler:
    def __init__(
        self,
        console: Console,
        view: PoolView | None = None,
        clock: Any = time.monotonic,
        engine: Engine | None = None,
        lease: Lease | None = None,
    ) -> None:
        self.console = console
        # Targets set on the page or the API, through any process: rows of the console's database.
        self.engine = engine if engine is not None else console.engine
        self.lease = lease or Lease(self.engine, "pools", ttl_s=LEASE_TTL_S)
        self.holding = False
        self.view = view or PoolView(clock)
        self._clock = clock
        self.targets: dict[Key, Target] = {}
        self.auto: dict[Key, bool] = {}
        self.states: dict[Key, ScaleState] = {}
        self.decisions: dict[Key, Decision] = {}
        self.pending: dict[Key, Pending] = {}
        self.added: set[tuple[str, str, str]] = set()  # (pool, model, device): tenants the scaler placed
        self.actions: deque[dict[str, Any]] = deque(maxlen=50)  # what it did, newest last
        self._task: asyncio.Task[None] | None = None
        self.load_targets()

    def attach(self) -> None:
        """Subscribe the console to members' announcements (before it connects)."""
        self.console.mqtt.subscriptions.append((pool_filter("members", self.console.prefix), 0))
        forward = self.console.mqtt.handler

        def handler(topic: str, payload: bytes) -> None:
            parsed = parse_pool_topic(topic, self.console.prefix)
            if parsed is not None and parsed[1] == "members":
                self.view.on_announcement(payload)
            else:
                forward(topic, payload)

        self.console.mqtt.handler = handler

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="pool-scaler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.holding:  # another process scales from its next tick, not after the lease runs out
            await asyncio.to_thread(self.lease.release)
            self.holding = False

    def set_target(self, pool: str, model: str, target: Target, auto: bool) -> None:
        """Store a target (blocking: the API calls it on a thread); it counts here at once, on the
        other processes at their next tick."""
        row = {
            "pool": pool,
            "model": model,
            "auto": int(auto),
            "target": json.dumps(dataclasses.asdict(target), sort_keys=True),
            "updated": time.time(),
        }
        with self.engine.begin() as conn:
            upsert(conn, pool_targets, [row], ["pool", "model"])
        self._use_target((pool, model), target, auto)

    def _use_target(self, key: Key, target: Target, auto: bool) -> None:
        self.targets[key] = target
        self.auto[key] = auto
        self.states.setdefault(key, ScaleState())

    def load_targets(self) -> None:
        """Every stored target (blocking); a row that does not parse is reported and skipped."""
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(pool_targets)).all()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("pool targets not read (database unavailable): %s", exc)
            return
        for row in rows:
            try:
                target = Target(**json.loads(row.target))
            except (ValueError, TypeError) as exc:
                log.error("pool target of %s (%s) not read (set it again): %s", row.pool, row.model, exc)
                continue
            key = (row.pool, row.model)
            if (self.targets.get(key), self.auto.get(key)) != (target, bool(row.auto)):
                self._use_target(key, target, bool(row.auto))

    async def run(self) -> None:
        while True:
            await self.turn()
            await asyncio.sleep(TICK_S)

    async def turn(self) -> None:
        """One tick: read the targets, take or renew the lease, and scale the pools if held."""
        try:
            await asyncio.to_thread(self.load_targets)
            held = await asyncio.to_thread(self.lease.held)
        except Exception:  # a bug must not end scaling for good: logged, next tick
            log.exception("pool scaling: the targets or the lease failed")
            held = False
        if self.holding and not held:
            log.warning("pool scaling: lease lost; another process scales the pools")
            self.pending.clear()
            self.decisions.clear()
            self.states = {k: ScaleState() for k in self.targets}
        self.holding = held
        for key in [k for k, on in self.auto.items() if on and held]:
            try:
                await self.step(key, self._clock())
            except (PlacementInvalid, PublishFailed) as exc:
                self._note(key, "failed", None, str(exc))
            except LeaseLost:
                break
            except Exception:  # a bug in one pool must not stop the others' scaling
                log.exception("pool scaling of %s failed", key)

    async def step(self, key: Key, now: float) -> Decision:
        pool, model = key
        figures = self.view.figures(pool, model)
        state = self.states.get(key, ScaleState())
        waiting = self.pending.get(key)
        if waiting is not None:
            joined = any(m.device_id == waiting.device_id for m in figures)
            if joined or now - waiting.since > JOIN_TIMEOUT_S:
                del self.pending[key]
                self.states[key] = ScaleState(last_change=now)  # the cooldown starts once it serves
            decision = Decision("hold", f"waiting for {waiting.device_id} to join", state)
            self.decisions[key] = decision
            return decision
        decision = decide(figures, self.view.capacity.get(key), self.targets[key], state, now)
        self.states[key] = decision.state
        self.decisions[key] = decision
        if decision.action == "add":
            device = await self.candidate(pool, model, {m.device_id for m in figures})
            if device is None:
                self.decisions[key] = Decision("hold", f"no device to add: {decision.reason}", state)
                return self.decisions[key]
            await self.add(pool, model, device)
            self.pending[key] = Pending(device, now)
            self._note(key, "added", device, decision.reason)
        elif decision.action == "remove" and decision.member is not None:
            await self.remove(pool, model, decision.member)
            self._note(key, "removed", decision.member, decision.reason)
        return decision

    async def candidate(self, pool: str, model: str, members: set[str]) -> str | None:
        """The least loaded online device outside the pool that has the model, or can get it."""
        store_has = self.console.config.public_url is not None and bool(
            await asyncio.to_thread(self.console.models.newest, model)
        )
        ranked = []
        for device_id, device in self.console.fleet.devices.items():
            if device_id in members or not device.online:
                continue
            caps = device.capabilities
            if not (caps is not None and model in caps.models) and not store_has:
                continue
            load = sum(t.fps for t in device.telemetry.tenants) if device.telemetry is not None else 0.0
            ranked.append((load, device_id))
        return min(ranked)[1] if ranked else None

    def _template(self, pool: str, model: str) -> TenantSpec:
        """A member's tenant for the model, as placed (a new member serves it alike)."""
        for (p, mo, device_id), _member in self.view.members.items():
            device = self.console.fleet.devices.get(device_id)
            placement = device.placement if device is not None else None
            for t in placement.tenants if (p, mo) == (pool, model) and placement is not None else []:
                if t.model == model:
                    fields = t.model_dump(include=set(TenantSpec.model_fields), exclude_none=True)
                    return TenantSpec.model_validate({**fields, "pool": pool})
        return TenantSpec(model=model, pool=pool)

    async def add(self, pool: str, model: str, device_id: str) -> None:
        device = self.console.device(device_id)
        tenants = device.editable_tenants()
        if any(t.model == model for t in tenants):
            tenants = [t.model_copy(update={"pool": pool}) if t.model == model else t for t in tenants]
            await self._publish_adding(device_id, tenants)
            return
        try:  # as a member serves it; else (a backend the device lacks) on the default backend
            await self._publish_adding(device_id, [*tenants, self._template(pool, model)])
        except PlacementInvalid:
            await self._publish_adding(device_id, [*tenants, TenantSpec(model=model, pool=pool)])
        self.added.add((pool, model, device_id))

    def _still_held(self) -> None:
        if not self.lease.still_held():
            raise LeaseLost

    async def _publish_adding(self, device_id: str, tenants: list[TenantSpec]) -> None:
        self._still_held()
        if self.console.config.public_url:  # the model store's copy first, if the device lacks it
            await self.console.deliver_missing(device_id, tenants, self.console.config.public_url, USER)
        self._still_held()
        await self.console.publish_placement(device_id, tenants, USER, "pool-add")

    async def remove(self, pool: str, model: str, device_id: str) -> None:
        device = self.console.device(device_id)
        tenants = device.editable_tenants()
        if (pool, model, device_id) in self.added:
            tenants = [t for t in tenants if t.model != model]
            self.added.discard((pool, model, device_id))
        else:
            tenants = [t.model_copy(update={"pool": None}) if t.model == model else t for t in tenants]
        self._still_held()
        await self.console.publish_placement(device_id, tenants, USER, "pool-remove")

    def _note(self, key: Key, what: str, device: str | None, reason: str) -> None:
        entry = {"ts": time.time(), "pool": key[0], "model": key[1], "action": what, "device_id": device}
        last = self.actions[-1] if self.actions else {}
        if (last.get("pool"), last.get("action"), last.get("reason")) == (key[0], what, reason):
            last["ts"] = entry["ts"]  # the same failure again: one line, its latest time
            return
        self.actions.append({**entry, "reason": reason})
        log.info("pool %s (%s): %s %s: %s", key[0], key[1], what, device or "", reason)

    def _objectives(self, model: str, members: list[dict[str, Any]]) -> dict[str, Any]:
        """Each member's share of answers within its tenant's latency objective (its telemetry, over
        all its frames of the model), and the pool's, weighted by the members' pool frames/s."""
        weighted = total = 0.0
        for row in members:
            device = self.console.fleet.devices.get(row["device_id"])
            tenants = device.telemetry.tenants if device is not None and device.telemetry is not None else []
            share = next((t.objective_share for t in tenants if t.model == model), None)
            row["objective_share"] = share
            if share is not None:
                weighted, total = weighted + share * row["fps"], total + row["fps"]
        return {"objective_share": round(weighted / total, 3) if total > 0 else None}

    def overview(self) -> list[dict[str, Any]]:
        """Every pool seen or targeted, with its figures, target and last decision (the API's list)."""
        out = []
        for pool, model in sorted(set(self.view.pools()) | set(self.targets)):
            key = (pool, model)
            target, decision = self.targets.get(key), self.decisions.get(key)
            summary = self.view.summary(pool, model)
            out.append(
                {
                    **summary,
                    **self._objectives(model, summary["members"]),
                    "target": None
                    if target is None
                    else {**target.__dict__, "auto": self.auto.get(key, False)},
                    "decision": None
                    if decision is None
                    else {"action": decision.action, "reason": decision.reason},
                    "actions": [a for a in self.actions if (a["pool"], a["model"]) == key][-10:],
                }
            )
        return out

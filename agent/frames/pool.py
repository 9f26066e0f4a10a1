"""Device pools on the agent (docs/pools.md): the tenants placed with `pool = "<name>"` also take
frames from the pool's shared subscription, and a full member leaves the share until it has room.

Pool subscriptions live on a second MQTT connection with session expiry 0 (made on the first pool
tenant). Measured on Mosquitto 2.0 (docs/pools.md, "When a member dies"): a member with a
persistent session that dies keeps being handed every Nth frame, queued for it until the session
expires; with no session the broker stops handing it frames the moment the connection ends, and
only what was in flight at the dead member is lost (the camera's retry covers that).

Back-pressure: Mosquitto hands frames round robin whatever a member's Receive Maximum or queue
(measured), so a full member unsubscribes and rejoins when it has drained (`want_open`). Members
announce on the pool's members topic whether they are open and busy; a member leaves only while
another open member has room, so the share is never empty (the broker drops a frame no one takes).

Exactly-once across the pool: each member learns the answers the others publish on the pool's
result topic into its duplicate memory, so a repeat of an answered frame that reaches another member
gets the first answer instead of being run again (agent/frames/dedup.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from agent.frames.ingest import Frame
from agent.frames.router import FrameRouter
from agent.frames.tenant_table import TenantTable
from agent.protocol.pools import HEARTBEAT_S, MEMBER_TTL_S, PoolMemberState
from agent.service.mqtt_session import Incoming, MqttSession, NotConnected

log = logging.getLogger(__name__)

LEAVE_AT = 0.75  # a member whose queue is this full leaves the share (if another has room)
REJOIN_AT = 0.25  # ... and rejoins once it is down to this
BUSY_AT = 0.5  # a member this full is announced busy: the others do not leave for it
HOPS = "pool_hops"  # user property of a frame a leaving member handed back to the pool
TICK_S = 0.02  # how often queues are looked at (a 64-frame queue fills in ~1 s at 60 fps)


def want_open(open_now: bool, fill: float, others_with_room: int) -> bool:
    """Whether a member should be in its pool's share. The last open member with room never leaves:
    a frame that no member's subscription takes is dropped by the broker."""
    if others_with_room == 0:
        return True
    if open_now:
        return fill < LEAVE_AT
    return fill <= REJOIN_AT


@dataclass
class Membership:
    """One tenant in one pool."""

    pool: str
    model: str
    filter: str
    open: bool = False
    busy: bool = False
    left: int = 0
    served: int = 0
    errors: int = 0
    latency_ms_sum: float = 0.0
    announced_at: float = 0.0


@dataclass
class Peer:
    state: PoolMemberState
    seen: float = field(default_factory=time.monotonic)


class PoolMembers:
    """Joins and leaves pools as the tenant table says, and applies back-pressure. Event loop only,
    but for `observe` (tenant threads)."""

    def __init__(
        self, device_id: str, table: TenantTable, router: FrameRouter, make_session: Callable[[], MqttSession]
    ) -> None:
        self.device_id = device_id
        self.table = table
        self.router = router
        self._make_session = make_session
        self.session: MqttSession | None = None
        self.members: dict[tuple[str, str], Membership] = {}  # (pool, model) -> membership
        self.peers: dict[tuple[str, str, str], Peer] = {}  # (pool, model, device) -> last announcement
        self.learned = 0  # answers of other members kept for repeats
        self.handed_back = 0  # frames published to the pool again (their model left this device)
        self._watched: set[str] = set()  # pools whose result and members topics are subscribed
        self._lock = threading.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._wake = asyncio.Event()  # a pool frame filled its tenant's queue: look now
        router.answer_hooks.append(self.observe)

    # -- the loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Every TICK_S: join/leave as placed, back-pressure, announcements."""
        while True:
            try:
                await self.tick(time.monotonic())
            except Exception:  # a bad tick must not end pools for good
                log.exception("pool tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()

    async def tick(self, now: float) -> None:
        if self._stopping:
            return
        wanted = {(spec.pool, model): spec for model, spec in self.table.serving_specs().items() if spec.pool}
        if wanted and self.session is None:
            self.session = self._make_session()
            self._tasks.append(asyncio.create_task(self.session.run(), name="pool-session"))
        session = self.session
        if session is None:
            return
        for key in [k for k in self.members if k not in wanted]:
            member = self.members.pop(key)
            await session.remove_subscription(member.filter)
            log.info("left pool %s for %s (no longer placed)", member.pool, member.model)
        for pool, model in wanted:
            if pool not in self._watched:
                topics = self.router.pool_topics(pool)
                await session.add_subscription(topics.result, self._on_result, qos=0)
                await session.add_subscription(topics.members, self._on_member, qos=0)
                self._watched.add(pool)
            if (pool, model) not in self.members:
                member = Membership(pool, model, self.router.pool_topics(pool).share(model))
                self.members[(pool, model)] = member
                log.info("joining pool %s for %s", pool, model)
        for member in self.members.values():
            await self._apply(session, member, now)

    async def _apply(self, session: MqttSession, member: Membership, now: float) -> None:
        tenant = self.table.get(member.model)
        depth = tenant.queue.depth if tenant is not None else 1
        queued = len(tenant.queue) if tenant is not None else 0
        fill = queued / depth
        others = self._others_with_room(member, now)
        open_ = want_open(member.open, fill, others) and tenant is not None and tenant.state == "ready"
        busy = fill >= BUSY_AT
        changed = open_ != member.open or busy != member.busy
        if open_ != member.open:
            if open_:
                await session.add_subscription(
                    member.filter, self._frames(member), qos=self.router.results_qos
                )
            else:
                await session.remove_subscription(member.filter)
                member.left += 1 if tenant is not None and tenant.state == "ready" else 0
            member.open = open_
        member.busy = busy
        if changed or now - member.announced_at >= HEARTBEAT_S:
            self._announce(session, member, queued, depth, now)

    def _frames(self, member: Membership) -> Callable[[Incoming], None]:
        """The pool's frames go to the router; one that fills the queue wakes the loop at once (frames
        keep coming until the broker has the UNSUBSCRIBE: each tick later is more of them)."""
        route = self.router.pool_handler(member.pool)

        def on_frame(message: Incoming) -> None:
            if self.table.get(member.model) is None and self._hand_back(message):
                return
            route(message)
            tenant = self.table.get(member.model)
            if tenant is not None and member.open and len(tenant.queue) >= tenant.queue.depth * LEAVE_AT:
                self._wake.set()

        return on_frame

    def _hand_back(self, message: Incoming) -> bool:
        """A pool frame for a model this device no longer serves (it left the pool, the broker had
        sent the frame before the UNSUBSCRIBE): publish it to the pool again, once, for a member
        that serves it. False when it cannot (MQTT 3.1.1, sent back once already, down)."""
        props, session = message.properties, self.session
        user = list(getattr(props, "UserProperty", None) or [])
        if props is None or session is None or any(k == HOPS for k, _v in user):
            return False
        again = Properties(PacketTypes.PUBLISH)
        for name in ("ResponseTopic", "CorrelationData", "MessageExpiryInterval", "ContentType"):
            if getattr(props, name, None) is not None:
                setattr(again, name, getattr(props, name))
        again.UserProperty = [*user, (HOPS, "1")]
        try:
            session.publish_nowait(message.topic, message.payload, 1, False, again, lambda: None)
        except NotConnected:
            return False
        self.handed_back += 1
        return True

    def _others_with_room(self, member: Membership, now: float) -> int:
        count = 0
        for (pool, model, device), peer in list(self.peers.items()):
            if now - peer.seen > MEMBER_TTL_S:
                del self.peers[(pool, model, device)]
                continue
            if (pool, model) == (member.pool, member.model) and peer.state.open and not peer.state.busy:
                count += 1
        return count

    def _announce(
        self, session: MqttSession, member: Membership, queued: int, depth: int, now: float
    ) -> None:
        with self._lock:
            served, errors, latency = member.served, member.errors, member.latency_ms_sum
        state = PoolMemberState(
            device_id=self.device_id,
            pool=member.pool,
            model=member.model,
            open=member.open,
            busy=member.busy,
            queued=queued,
            depth=depth,
            served=served,
            errors=errors,
            latency_ms_sum=round(latency, 3),
            left=member.left,
        )
        try:
            session.publish_nowait(
                self.router.pool_topics(member.pool).members,
                state.model_dump_json().encode(),
                0,
                False,
                None,
                lambda: None,
            )
            member.announced_at = now
        except NotConnected:
            pass  # announced again on the next tick once connected

    # -- what the pool says -------------------------------------------------------------------------
    def _on_member(self, message: Incoming) -> None:
        try:
            state = PoolMemberState.model_validate_json(message.payload)
        except ValidationError:
            log.warning("unreadable pool announcement on %s", message.topic)
            return
        if state.device_id != self.device_id:
            self.peers[(state.pool, state.model, state.device_id)] = Peer(state)

    def _on_result(self, message: Incoming) -> None:
        """Another member's answer: a repeat of its frame that reaches this member gets it too."""
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(doc, dict) or "error" in doc or doc.get("served_by") == self.device_id:
            return
        model, request_id = doc.get("model"), doc.get("request_id")
        if isinstance(model, str) and isinstance(request_id, str) and self.router.recent.enabled:
            self.router.recent.learn((model, request_id), bytes(message.payload))
            self.learned += 1

    def observe(self, frame: Frame, outcome: Any) -> None:
        """Every answer (tenant threads): pool frames' counts and latency for the announcements."""
        if frame.pool is None:
            return
        member = self.members.get((frame.pool, frame.model))
        if member is None:
            return
        with self._lock:
            if getattr(outcome, "error", None) is not None:
                member.errors += 1
            else:
                member.served += 1
                member.latency_ms_sum += (time.monotonic() - frame.received) * 1000.0

    async def stop(self) -> None:
        """Leave every pool at once (the others take its frames), then close the connection."""
        self._stopping = True
        session = self.session
        if session is not None:
            for member in self.members.values():
                if member.open:
                    await session.remove_subscription(member.filter)
                    member.open = False
            await session.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

"""The console service: MQTT ingest -> fleet state -> SQLite history and live events; placements out.

Everything here runs on one event loop (the one uvicorn serves HTTP on). Ingest handlers are plain
functions that parse a message with pydantic and update memory: no I/O, no awaits, so a burst of
telemetry cannot interleave with a placement being computed. SQLite writes go to the store's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiomqtt
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from agent.protocol.delivery import ModelDelivery
from agent.protocol.editing import (
    DesiredPlacement,
    PlacementInvalid,
    Tracking,
    auto_tenants,
    build,
    check_against,
    move_tenants,
    track,
)
from agent.protocol.schemas import Placement, Status, Telemetry, TenantSpec
from agent.protocol.signing import load_private_key, sign
from agent.protocol.topics import Topics, fleet_filter, parse_device_topic
from cloud_console import db as schema
from cloud_console.auth import PasswordUpgrades, SessionSigner
from cloud_console.config import ConsoleConfig, ConsoleConfigError, UserConfig, parse_broker_url
from cloud_console.convergence import Convergence
from cloud_console.db import (
    DatabaseError,
    Lease,
    adopt_files,
    migrate,
    open_engine,
    process_name,
    shared_secret,
    upsert,
)
from cloud_console.events import Hub
from cloud_console.fleet import Device, Fleet
from cloud_console.model_store import ModelRejected, ModelStore
from cloud_console.mqtt import ConsoleMqtt, PublishFailed
from cloud_console.shared_telemetry import REFRESH_S, SharedTelemetry
from cloud_console.store import ConsoleStore
from cloud_console.tokens import TokenStore

log = logging.getLogger(__name__)

FLEET_EVENT_INTERVAL_S = 1.0
# Fleet pages get the counts at least this often, also when no row changed (ages and states drift).
FLEET_COUNTS_INTERVAL_S = 5.0
# Convergence (docs/operations.md#broker-clusters): a device whose status shows an older generation
# than the console's desired placement gets it published again, at most once per device in this
# long, and at most this many devices a second (a console start over a large fleet behind on its
# placements does not publish them all at once). A placement this console just published is given
# REPUBLISH_GRACE_S to arrive first.
REPUBLISH_INTERVAL_S = 30.0
REPUBLISH_PER_S = 50
REPUBLISH_GRACE_S = 5.0
FOLLOW_ALL_OVER = 100  # more devices to follow live than this: every device's telemetry, one filter


class UnknownDevice(LookupError):
    pass


@dataclass
class MoveOutcome:
    published: list[dict[str, Any]]
    skipped: list[dict[str, Any]]


class Console:
    def __init__(self, config: ConsoleConfig, session_secret: bytes | None = None) -> None:
        self.config = config
        self.prefix = config.topic_prefix
        self.users: dict[str, UserConfig] = {u.name: u for u in config.users}
        # One database for history, sessions, tokens and model records (SQLite or PostgreSQL):
        # migrated here, before anything reads it (docs/operations.md#postgresql).
        try:
            self.engine = open_engine(config.storage.url())
            migrate(self.engine)
            adopt_files(self.engine, config.storage.db)  # what the previous version kept in files
            # No configured secret: the one the database keeps, the same for every process on it.
            secret = (
                session_secret or (config.web.session_secret or "").encode() or shared_secret(self.engine)
            )
        except DatabaseError as exc:
            raise ConsoleConfigError(str(exc)) from exc
        self.signer = SessionSigner(secret, config.web.session_max_age_s, db=self.engine)
        self.passwords = PasswordUpgrades(self.engine)
        self.tokens = TokenStore(self.engine)
        self.tokens.revoke_all_but(set(self.users))
        self.sign_key: Ed25519PrivateKey | None = None
        if config.signing.key_file is not None:
            try:
                self.sign_key = load_private_key(config.signing.key_file)
            except (OSError, ValueError, TypeError) as exc:
                raise ConsoleConfigError(f"signing key {config.signing.key_file}: {exc}") from exc
        self.fleet = Fleet(config.stale_after_s, counts_max_age_s=FLEET_EVENT_INTERVAL_S)
        self.hub = Hub()
        storage = config.storage
        self.store = ConsoleStore(
            self.engine,
            storage.retention_hours * 3600.0,
            storage.flush_interval_s,
            downsample_after_s=(
                storage.downsample_after_hours * 3600.0 if storage.downsample_after_hours else None
            ),
            downsample_bucket_s=storage.downsample_bucket_s,
            max_rows=storage.max_telemetry_rows,
        )
        self.mqtt = ConsoleMqtt(
            parse_broker_url(config.broker.url),
            config.broker,
            self.prefix,
            self.dispatch,
            shared_group=config.shared_group,
            ack_after=self.store.batch_number,  # with a shared group: acked once stored
            stable_id=config.web.listen.rpartition(":")[2],  # the same id (and session) after a restart
            live_handler=self.on_live_telemetry,
        )
        # Uploaded model versions: files in a folder, records in the database (docs/fleet.md).
        self.models = ModelStore(storage.model_store_dir(), self.engine)
        self.holder = process_name()
        # A shared group: each process stores part of the telemetry; the fleet rows are made whole
        # from what the others stored (shared_telemetry.py).
        self.shared: SharedTelemetry | None = None
        if config.shared_group:
            self.store.share_as = self.holder
            self.shared = SharedTelemetry(self.engine, self.holder)
        # A shared group: placements are converged (published again) by one process at a time.
        self._convergence_lease = Lease(self.engine, "convergence", ttl_s=config.shared_group_timeout_s)
        self.converger = False
        # Versions each device should install, sent again until its status lists them (docs/fleet.md).
        self.convergence = Convergence()
        self._base_url = config.public_url  # else the URL the last delivery was asked through
        self._converging: set[asyncio.Task[Any]] = set()
        self.bad_messages = 0
        self.by_kind: dict[str, int] = {"status": 0, "telemetry": 0, "placement": 0}
        self._dirty: set[str] = set()
        self._shown: dict[str, float] = {}  # device id -> ts of the last telemetry sent to its pages
        self._unclaimed: dict[str, DesiredPlacement] = {}  # device id -> placement seen before the device
        self._rate_samples: deque[tuple[float, int]] = deque(maxlen=11)
        # Devices whose every telemetry message this process needs, not only its share of the group's
        # (the devices of the rollouts it steps: their gates judge the devices' figures).
        self.followed: set[str] = set()
        self._republished: deque[float] = deque()  # when, for the REPUBLISH_PER_S limit
        self.republishes = 0
        self.marked_silent = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def committed(batch: int) -> None:  # on the writer thread
            loop.call_soon_threadsafe(self.mqtt.acknowledge_through, batch)

        self.store.on_commit = committed
        await asyncio.to_thread(self.store.start)
        await asyncio.to_thread(self._load_known_devices)
        self._tasks = [
            asyncio.create_task(self.mqtt.run(), name="mqtt"),
            asyncio.create_task(self._fleet_events(), name="fleet-events"),
        ]
        if self.mqtt.persistent:
            self._tasks.append(asyncio.create_task(self._sessions(), name="sessions"))
        if self.shared is not None:
            self._tasks.append(asyncio.create_task(self._shared_telemetry(), name="shared-telemetry"))

    async def stop(self) -> None:
        if self.mqtt.persistent:
            # A shared group: nothing new comes once unsubscribed; what came is handled, stored
            # (the writer's last flush) and acknowledged before the connection closes.
            await self.mqtt.leave()
            for _ in range(100):
                if not self.mqtt.backlog():
                    break
                await asyncio.sleep(0.02)  # the dispatch task is handling what arrived
            await asyncio.to_thread(self.store.stop)
            await asyncio.sleep(0)  # the acknowledgements the last flush scheduled on this loop
            await asyncio.to_thread(self._beat, True)  # left: another process drains what is left
        self.mqtt.stop()
        self.hub.close_all()
        for task in [*self._tasks, *self._converging]:
            task.cancel()
        for task in [*self._tasks, *self._converging]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self.store.stop)
        await asyncio.to_thread(self.engine.dispose)

    def _load_known_devices(self) -> None:
        """Devices seen before a restart, shown as last known until the broker's retained status."""
        for row in self.store.known_devices():
            try:
                status = Status.model_validate_json(row["status_json"])
            except (ValidationError, TypeError):
                continue
            device = self.fleet.get_or_add(row["device_id"], row["first_seen"])
            device.last_seen = row["last_seen"]
            device.status = status
            device.capabilities = status.capabilities
            device.placement = status.placement
            device.desired = self._last_published(row["device_id"])

    def _last_published(self, device_id: str) -> DesiredPlacement | None:
        """The last placement this console published to the device, from its database: what it
        converges the device to even when no broker node kept the retained copy (a retained one that
        arrives replaces it)."""
        for row in self.store.placements_of(device_id, 1):
            try:
                doc = Placement.model_validate_json(row["document"])
            except (ValidationError, TypeError):
                return None
            return DesiredPlacement(doc.generation, doc.tenants, row["ts"], row["user"], row["action"])
        return None

    # -- the sessions of a shared group ---------------------------------------------------------
    async def _sessions(self) -> None:
        """Note this process alive; drain the MQTT session of a process that died or left (one
        drainer per session: a lease), so its unstored telemetry is stored without waiting for it."""
        while True:
            try:
                await asyncio.to_thread(self._beat)
                self.converger = await asyncio.to_thread(self._convergence_lease.held)
                for client_id in await asyncio.to_thread(self._gone_peers):
                    lease = Lease(self.engine, f"drain:{client_id}", ttl_s=300.0)
                    if not await asyncio.to_thread(lease.held):
                        continue
                    try:
                        await self.mqtt.drain_session(client_id, lambda topic: topic.endswith("/telemetry"))
                        await asyncio.to_thread(self._forget_peer, client_id)
                    except (aiomqtt.MqttError, TimeoutError) as exc:
                        log.warning("could not drain the session of %s (%s)", client_id, exc)
                    finally:
                        await asyncio.to_thread(lease.release)
            except sa.exc.SQLAlchemyError as exc:
                log.warning("console processes: database unavailable (%s)", exc)
            await asyncio.sleep(self.config.shared_group_timeout_s / 4)

    def _beat(self, left: bool = False) -> None:
        row = {
            "client_id": self.mqtt.client_id,
            "holder": self.holder,
            "seen": time.time(),
            "left_at": time.time() if left else None,
        }
        with self.engine.begin() as conn:
            upsert(conn, schema.console_processes, [row], ["client_id"])

    def _gone_peers(self) -> list[str]:
        t = schema.console_processes.c
        gone = sa.or_(t.left_at.is_not(None), t.seen < time.time() - self.config.shared_group_timeout_s)
        with self.engine.connect() as conn:
            return list(conn.scalars(sa.select(t.client_id).where(t.client_id != self.mqtt.client_id, gone)))

    def _forget_peer(self, client_id: str) -> None:
        """Drained: forgotten, unless it came back meanwhile (then its heartbeat is fresh)."""
        t = schema.console_processes.c
        gone = sa.or_(t.left_at.is_not(None), t.seen < time.time() - self.config.shared_group_timeout_s)
        with self.engine.begin() as conn:
            conn.execute(sa.delete(schema.console_processes).where(t.client_id == client_id, gone))

    # -- ingest ---------------------------------------------------------------------------------
    def dispatch(self, topic: str, payload: bytes) -> None:
        """Route one MQTT message by its topic: <prefix>/<device id>/<kind>."""
        parsed = parse_device_topic(topic, self.prefix)
        if parsed is None:
            return
        device_id, kind = parsed
        if kind == "telemetry":
            self.on_telemetry(device_id, payload)
        elif kind == "status":
            self.on_status(device_id, payload)
        elif kind == "placement":
            self.on_placement(device_id, payload)
        else:
            return
        self.by_kind[kind] += 1

    def _bad(self, kind: str, device_id: str, exc: ValidationError) -> None:
        """Count a message that does not parse; log the first ones, then one in a thousand."""
        self.bad_messages += 1
        if self.bad_messages <= 10 or self.bad_messages % 1000 == 0:
            first = exc.errors()[:1]
            where = ".".join(str(p) for p in first[0]["loc"]) if first else ""
            log.warning(
                "bad %s from %s (%d so far): %s: %s",
                kind,
                device_id,
                self.bad_messages,
                where or "document",
                first[0]["msg"] if first else exc,
            )

    def _device(self, device_id: str, now: float) -> Device:
        device = self.fleet.devices.get(device_id)
        if device is None:
            device = self.fleet.get_or_add(device_id, now)
            device.desired = self._unclaimed.pop(device_id, None)
        return device

    def on_status(self, device_id: str, payload: bytes) -> None:
        if not payload:  # retained status cleared: the device is gone from the fleet
            if self.fleet.devices.pop(device_id, None) is not None:
                self._dirty.add(device_id)
            self.store.forget_device(device_id)
            self.convergence.forget(device_id)
            return
        try:
            status = Status.model_validate_json(payload)
        except ValidationError as exc:
            self._bad("status", device_id, exc)
            return
        now = time.time()
        device = self._device(device_id, now)
        if not status.tags and not status.online and device.status is not None:
            status.tags = device.status.tags  # a last will carries no tags: selectors keep matching
        device.status = status
        device.last_seen = now
        device.silent = False
        if status.capabilities is not None:
            device.capabilities = status.capabilities
        if status.placement is not None:
            device.placement = status.placement
        device.touch()
        self._dirty.add(device_id)
        self.store.put_device(device_id, status.online, device.first_seen, now, payload.decode())
        if self.hub.wants_device(device_id):
            self.hub.to_device(device_id, "device", self.detail(device))
        self._converge(device_id, device)
        self._converge_placement(device, now)

    # -- delivery convergence (cloud_console/convergence.py) -------------------------------------------
    def _converge(self, device_id: str, device: Device) -> None:
        """A status arrived: send again what the device still lacks, and publish again a placement it
        refused for want of a version it now has. Cheap; the sends run as tasks."""
        now = time.monotonic()
        self.convergence.seen(device_id, device.online, now)
        caps = device.capabilities
        installed = {(m.name, v.version) for m in caps.installed for v in m.versions} if caps else set()
        desired = device.desired
        pinned = [(t.model, t.version) for t in desired.tenants if t.version] if desired else []
        for model, version, base_url in self.convergence.due(device_id, installed, pinned, now):
            base = base_url or self._base_url
            if base is None:
                continue  # no URL known yet for the manifest: the next delivery through the API sets one
            self.convergence.sent(device_id, model, version, base, now)
            self._spawn(self._resend(device_id, model, version, base), f"resend {model} {version}")
        placement = device.status.placement if device.status else None
        # Only what this console published is published again (not a document seen on the broker).
        if desired is not None and desired.published_at is not None and placement is not None:
            refused = placement.refused.generation if placement.refused else None
            applied = placement.applied_generation
            if self.convergence.republish(device_id, desired.generation, refused, applied, installed, pinned):
                self._spawn(self._republish(device_id, desired), f"republish {device_id}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._converging.add(task)
        task.add_done_callback(self._converging.discard)

    async def _resend(self, device_id: str, model: str, version: str, base_url: str) -> None:
        try:
            await self._send_manifest(device_id, model, version, base_url)
            log.info("sent %s %s to %s again (its status lacks it)", model, version, device_id)
        except ModelRejected:
            self.convergence.give_up(device_id, model, version)
            log.warning("%s lacks %s %s, which the model store does not have", device_id, model, version)
        except (PublishFailed, LookupError) as exc:
            log.warning("sending %s %s to %s again: %s", model, version, device_id, exc)

    async def _republish(self, device_id: str, desired: DesiredPlacement) -> None:
        """The device refused the placement while it lacked a version it now has: the same tenants
        again, as a new generation."""
        log.info(
            "%s now has the versions of placement %d: publishing it again", device_id, desired.generation
        )
        try:
            await self.publish_placement(
                device_id, desired.tenants, desired.by or "console", "converge", check=False
            )
        except (PublishFailed, PlacementInvalid, LookupError) as exc:
            log.warning("publishing the placement of %s again: %s", device_id, exc)

    def on_telemetry(self, device_id: str, payload: bytes) -> None:
        try:
            telemetry = Telemetry.model_validate_json(payload)
        except ValidationError as exc:
            self._bad("telemetry", device_id, exc)
            return
        now = time.time()
        device = self._device(device_id, now)
        device.telemetry = telemetry
        device.telemetry_at = now
        device.last_seen = now
        if device.silent:  # shown offline for silence: it is back
            device.silent = False
            device.touch()
        else:
            device.touch(telemetry=True)
        self._dirty.add(device_id)
        self.store.add_telemetry(device_id, telemetry, payload, now)
        self._show_live(device_id, telemetry)

    def _show_live(self, device_id: str, telemetry: Telemetry) -> None:
        """To the device's open pages, once per message (it may come as a stored and a live copy)."""
        if not self.hub.wants_device(device_id) or self._shown.get(device_id, -1.0) >= telemetry.ts:
            return
        self._shown[device_id] = telemetry.ts
        self.hub.to_device(device_id, "telemetry", telemetry.model_dump(mode="json"))

    def on_live_telemetry(self, topic: str, payload: bytes) -> None:
        """A watched device's telemetry that another process of the group stores: shown, not stored."""
        parsed = parse_device_topic(topic, self.prefix)
        device = self.fleet.devices.get(parsed[0]) if parsed is not None else None
        if device is None:
            return
        try:
            telemetry = Telemetry.model_validate_json(payload)
        except ValidationError as exc:
            self._bad("telemetry", device.device_id, exc)
            return
        if device.telemetry is None or device.telemetry.ts < telemetry.ts:
            device.telemetry = telemetry
            device.telemetry_at = device.last_seen = time.time()
            device.touch()
            self._dirty.add(device.device_id)
        self._show_live(device.device_id, telemetry)

    async def _shared_telemetry(self) -> None:
        """Every REFRESH_S: the telemetry other processes of the group stored, into the fleet rows."""
        shared = self.shared
        if shared is None:
            return
        devices = self.fleet.devices

        def held(device_id: str) -> float | None:  # (on the reading thread: dict and attribute reads)
            device = devices.get(device_id)
            return device.telemetry.ts if device is not None and device.telemetry is not None else None

        while True:
            try:
                found = await asyncio.to_thread(shared.read, held)
                self.apply_shared(found, time.time())
            except Exception:  # never the end of the refresh: the next one tries again
                log.exception("shared telemetry: refresh failed")
            await asyncio.sleep(REFRESH_S)

    def apply_shared(self, found: list[tuple[str, Telemetry, float]], now: float) -> int:
        """Telemetry another process stored, newer than the device's here: as if received here then
        (its receive time is the storing process's). Devices unknown here are left to their status."""
        applied = 0
        for device_id, telemetry, received_at in found:
            device = self.fleet.devices.get(device_id)
            if device is None or (device.telemetry is not None and device.telemetry.ts >= telemetry.ts):
                continue
            device.telemetry = telemetry
            device.telemetry_at = received_at
            device.last_seen = max(device.last_seen, min(received_at, now))
            if device.silent and now - device.last_seen <= self.config.offline_after_s:
                device.silent = False  # shown offline for silence: it is back
                device.touch()
            else:
                device.touch(telemetry=True)
            self._dirty.add(device_id)
            applied += 1
        if self.shared is not None:
            self.shared.applied += applied
        return applied

    def on_placement(self, device_id: str, payload: bytes) -> None:
        """The retained desired placement, read back (ours, or another console worker's)."""
        device = self.fleet.devices.get(device_id)
        if not payload:
            self._unclaimed.pop(device_id, None)
            if device is not None and device.desired is not None:
                device.desired = None
                device.touch()
            return
        try:
            doc = Placement.model_validate_json(payload)
        except ValidationError as exc:
            self._bad("placement", device_id, exc)
            return
        if device is None:
            # A placement for a device that has not reported (yet): keep it aside rather than invent
            # a fleet row from a retained document (it may be left over from a retired device).
            self._unclaimed[device_id] = DesiredPlacement(doc.generation, doc.tenants)
            return
        held = device.desired
        if held is not None and held.generation == doc.generation:
            held.tenants = doc.tenants  # our own publish coming back: keep who and when
        else:
            device.desired = DesiredPlacement(doc.generation, doc.tenants)
        device.touch()
        self._dirty.add(device_id)

    # -- convergence: desired placement from live status, not from retained copies alone ---------
    def needs_placement(self, device: Device) -> bool:
        """Whether the device, online, reports an older generation than the placement this console
        published to it and has not refused that one: on a broker cluster that does not share
        retained messages, the node it is connected to may never have had the retained placement.
        A document only read back (`published_at` None: another publisher's) is not signed and sent
        again by this console."""
        desired, status = device.desired, device.status
        if desired is None or desired.published_at is None or status is None or status.placement is None:
            return False
        if not device.online:
            return False
        seen = status.placement.generation
        if seen is not None and seen >= desired.generation:
            return False
        return track(desired, device.effective_status()).state != "refused"

    def _converge_placement(self, device: Device, now: float) -> None:
        """Publish the desired placement again where `needs_placement` (rate-limited): a placement the
        device's broker node never had (delivery convergence above handles one it refused)."""
        if not self.needs_placement(device) or device.desired is None:
            return
        desired = device.desired
        if now - device.republished_at < REPUBLISH_INTERVAL_S:
            return
        if desired.published_at is not None and now - desired.published_at < REPUBLISH_GRACE_S:
            return
        while self._republished and now - self._republished[0] > 1.0:
            self._republished.popleft()
        if len(self._republished) >= REPUBLISH_PER_S or not self.mqtt.connected.is_set():
            return  # the next sweep (once a second) comes back to it
        self._republished.append(now)
        device.republished_at = now
        self._spawn(self._republish_same(device.device_id, desired), f"converge {device.device_id}")

    async def _republish_same(self, device_id: str, desired: DesiredPlacement) -> None:
        """The desired placement again, the same generation: the device's node never had it."""
        status = self.fleet.devices[device_id].status if device_id in self.fleet.devices else None
        reported = status.placement.generation if status and status.placement else None
        try:
            doc = build(desired.generation, desired.tenants)
            await self.mqtt.publish(
                Topics(device_id, self.prefix).placement, self._wire(doc), qos=1, retain=True
            )
        except (PublishFailed, ValidationError) as exc:
            log.warning(
                "re-publishing placement generation %d to %s failed: %s", desired.generation, device_id, exc
            )
            return
        self.republishes += 1
        log.info(
            "re-published placement generation %d to %s: its status reports generation %s",
            desired.generation,
            device_id,
            reported,
        )

    def mark_silent(self, now: float) -> list[str]:
        """Devices that claim online but sent nothing for `offline_after_s` are shown offline: on a
        broker cluster their last will may be published on a node this console does not hear."""
        limit = self.config.offline_after_s
        marked = []
        for device in self.fleet.devices.values():
            if device.silent or not device.online or now - device.last_seen <= limit:
                continue
            device.silent = True
            device.touch()
            self._dirty.add(device.device_id)
            marked.append(device.device_id)
            if self.hub.wants_device(device.device_id):
                self.hub.to_device(device.device_id, "device", self.detail(device))
        if marked:
            self.marked_silent += len(marked)
            log.info(
                "%d device(s) silent for over %.0f s shown offline: %s",
                len(marked),
                limit,
                ", ".join(marked[:10]) + (" ..." if len(marked) > 10 else ""),
            )
        return marked

    def sweep(self, now: float) -> None:
        """Once a second: silent devices offline; devices behind their desired placement converged."""
        self.mark_silent(now)
        if self.mqtt.persistent and not self.converger:
            return  # a shared group: the process holding the "convergence" lease publishes, once
        for device in self.fleet.devices.values():
            if device.desired is not None:
                self._converge_placement(device, now)

    # -- live events ----------------------------------------------------------------------------
    async def _fleet_events(self) -> None:
        """Once a second: sample the ingest rate, sweep, and send fleet pages the fleet-wide counts
        and the changed rows each shows."""
        counts_sent = 0.0
        while True:
            await asyncio.sleep(FLEET_EVENT_INTERVAL_S)
            self._rate_samples.append((time.monotonic(), self.mqtt.received))
            if self.mqtt.persistent:  # a shared group: open device pages follow every message
                pages = self.hub.watched_devices() & self.fleet.devices.keys()  # no wildcards from URLs
                self._shown = {d: ts for d, ts in self._shown.items() if d in pages}
                followed = (pages | self.followed) & self.fleet.devices.keys()
                await self.mqtt.watch(
                    {fleet_filter("telemetry", self.prefix)}  # one subscription, not thousands
                    if len(followed) > FOLLOW_ALL_OVER
                    else {Topics(d, self.prefix).telemetry for d in followed}
                )
            now = time.time()
            self.sweep(now)
            dirty, self._dirty = self._dirty, set()
            if not self.hub.has_fleet_pages() or (not dirty and now - counts_sent < FLEET_COUNTS_INTERVAL_S):
                continue
            watched = self.hub.watched()
            rows: dict[str, dict[str, Any]] = {}
            removed = []
            for device_id in sorted(dirty):
                device = self.fleet.devices.get(device_id)
                if device is None:
                    removed.append(device_id)
                elif watched is None or device_id in watched:
                    rows[device_id] = device.summary(now, self.fleet.stale_after_s)
                else:
                    # Rows no page shows are rebuilt here, off the request path: the next page
                    # request finds them cached.
                    device.keys()
            counts_sent = now
            common = {"counts": self.fleet.counts(now), "stats": self.stats()}
            self.hub.to_fleet_rows(rows, removed, common)

    def rate(self) -> float:
        """Messages per second handled over the last ~10 s."""
        if len(self._rate_samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rate_samples[0], self._rate_samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def stats(self) -> dict[str, Any]:
        counts = self.fleet.counts()  # (reused for a second: the pages ask for stats with every page)
        return {
            "mqtt_connected": self.mqtt.connected.is_set(),
            "mqtt_connects": self.mqtt.connects,
            "mqtt_broker": self.mqtt.broker,
            "devices": len(self.fleet.devices),
            "online": counts["online"] + counts["stale"],  # (stale devices still claim online)
            "received": self.mqtt.received,
            "by_kind": dict(self.by_kind),
            "messages_per_s": round(self.rate(), 1),
            "backlog": self.mqtt.backlog(),
            "db_pending_rows": self.store.pending(),
            "db_written_rows": self.store.written,
            "db_lost_rows": self.store.lost,
            "db_last_flush_ms": round(self.store.last_flush_ms, 1),
            "bad_messages": self.bad_messages,
            "handler_errors": self.mqtt.handler_errors,
            "event_streams": len(self.hub),
            "uptime_s": round(time.time() - self.started_at, 1),
            "stale_after_s": self.fleet.stale_after_s,
            "offline_after_s": self.config.offline_after_s,
            "placements_republished": self.republishes,
            "devices_marked_silent": self.marked_silent,
            **(
                {
                    "shared_telemetry_applied": self.shared.applied,
                    "shared_telemetry_read_ms": round(self.shared.last_read_ms, 1),
                    "shared_telemetry_window_rows": self.shared.last_changed,
                }
                if self.shared is not None
                else {}
            ),
        }

    # -- views ----------------------------------------------------------------------------------
    def fleet_capabilities(self) -> dict[str, Any]:
        models: set[str] = set()
        backends: dict[str, set[str]] = {}
        running: set[tuple[str, str]] = set()
        for device in self.fleet.devices.values():
            caps = device.capabilities
            if caps is not None:
                models.update(caps.models)
                for name, backend in caps.backends.items():
                    if backend.available:
                        backends.setdefault(name, set()).update(backend.devices)
            for tenant in device.editable_tenants():
                running.add((tenant.model, tenant.backend))
        return {
            "models": sorted(models),
            "backends": {name: sorted(devs) for name, devs in sorted(backends.items())},
            "running": [{"model": m, "backend": b} for m, b in sorted(running)],
        }

    def device(self, device_id: str) -> Device:
        device = self.fleet.devices.get(device_id)
        if device is None:
            raise UnknownDevice(device_id)
        return device

    def detail(self, device: Device) -> dict[str, Any]:
        status = device.effective_status()
        return {
            "seq": device.seq,
            "summary": device.summary(time.time(), self.fleet.stale_after_s),
            "status": status.model_dump(mode="json") if status is not None else None,
            "capabilities": device.capabilities.model_dump(mode="json") if device.capabilities else None,
            "telemetry": device.telemetry.model_dump(mode="json") if device.telemetry else None,
            "desired": (
                {
                    "generation": device.desired.generation,
                    "tenants": [t.model_dump(mode="json") for t in device.desired.tenants],
                    "published_at": device.desired.published_at,
                    "by": device.desired.by,
                    "action": device.desired.action,
                }
                if device.desired is not None
                else None
            ),
            "tracking": device.tracking(),
            "editable_tenants": [t.model_dump(mode="json") for t in device.editable_tenants()],
            "next_generation": device.next_generation(),
        }

    # -- placements out -------------------------------------------------------------------------
    async def publish_placement(
        self, device_id: str, tenants: list[TenantSpec], user: str, action: str, *, check: bool = True
    ) -> tuple[Placement, Tracking]:
        """Validate against the device's capabilities, then publish (retained, QoS 1).

        The generation is max(applied, desired) + 1, taken and recorded before the first await, so
        two edits in a row never reuse a generation."""
        device = self.device(device_id)
        if check:
            tenants = check_against(device.capabilities, tenants)
        try:
            doc = build(device.next_generation(), tenants)
        except ValidationError as exc:
            raise PlacementInvalid(
                "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
            ) from exc
        previous = device.desired
        device.desired = DesiredPlacement(doc.generation, doc.tenants, time.time(), user, action)
        device.touch()
        self._dirty.add(device_id)
        payload = self._wire(doc)
        try:
            await self.mqtt.publish(Topics(device_id, self.prefix).placement, payload, qos=1, retain=True)
        except PublishFailed:
            if device.desired is not None and device.desired.generation == doc.generation:
                device.desired = previous  # nothing went out: forget it
                device.touch()
            raise
        self.store.add_placement(device_id, doc.generation, user, action, payload.decode())
        log.info("%s published placement generation %d to %s (%s)", user, doc.generation, device_id, action)
        if self.hub.wants_device(device_id):
            self.hub.to_device(device_id, "device", self.detail(device))
        signed = Placement.model_validate_json(payload)  # what went out: with its signature, if signed
        return signed, track(device.desired, device.effective_status())

    def _wire(self, doc: Placement) -> bytes:
        """The document as published: signed (expiry and a fresh signed_at) when the console has a
        signing key; a newer generation than the applied one is the replay protection."""
        if self.sign_key is None:
            return doc.model_dump_json().encode()
        body = doc.model_dump(mode="json", exclude_none=True)
        return json.dumps(sign(body, self.sign_key, valid_s=self.config.signing.valid_s)).encode()

    async def deliver(
        self, device_id: str, name: str, version: str, base_url: str, user: str
    ) -> ModelDelivery:
        """Tell the device to fetch `name` `version` from this console (QoS 1, not retained: a device
        that is offline now is delivered to again later). Signed like placements when signing is on."""
        self.device(device_id)
        doc = await self._send_manifest(device_id, name, version, base_url)
        # Sent again while the device's status lacks it (it may be offline now).
        self.convergence.sent(device_id, name, version, base_url, time.monotonic())
        log.info("%s delivers %s %s to %s", user, name, version, device_id)
        return doc

    async def _send_manifest(self, device_id: str, name: str, version: str, base_url: str) -> ModelDelivery:
        doc = await asyncio.to_thread(self.models.manifest, name, version, base_url)
        body = doc.model_dump(mode="json", exclude_none=True)
        if self.sign_key is not None:
            body = sign(body, self.sign_key, valid_s=self.config.signing.valid_s)
        payload = json.dumps(body).encode()
        self._base_url = self.config.public_url or base_url
        await self.mqtt.publish(Topics(device_id, self.prefix).models, payload, qos=1, retain=False)
        return ModelDelivery.model_validate_json(payload)

    async def deliver_missing(
        self, device_id: str, tenants: list[TenantSpec], base_url: str, user: str, timeout_s: float = 900.0
    ) -> list[tuple[str, str]]:
        """Placement follows delivery: deliver each version the tenants need that the device lacks
        and the store has (a pinned `version`, or the newest of a model the device has none of),
        and wait until the device's status lists them installed. Raises PlacementInvalid with the
        device's reason when a delivery fails. Returns what was delivered."""
        device = self.device(device_id)
        caps = device.capabilities
        have = {(m.name, v.version) for m in caps.installed for v in m.versions} if caps else set()
        names = {name for name, _ in have} | set(caps.models if caps else [])
        wanted = []
        for tenant in tenants:
            version = tenant.version
            if version is None and tenant.model not in names:
                version = await asyncio.to_thread(self.models.newest, tenant.model)
            if version is not None and (tenant.model, version) not in have:
                try:
                    await asyncio.to_thread(self.models.get, tenant.model, version)
                except ModelRejected:
                    continue  # not in the store either: the device refuses it with the reason
                wanted.append((tenant.model, version))
        if not wanted:
            return []
        if not device.online:
            # Delivered when it is back (cloud_console/convergence.py); the placement it refuses
            # meanwhile is published again once it has the versions.
            for model, version in wanted:
                self.convergence.want(device_id, model, version, base_url)
            self._base_url = self.config.public_url or base_url
            log.info("%s is offline: %s delivered when it is back", device_id, wanted)
            return wanted
        started = time.time()
        for model, version in wanted:
            await self.deliver(device_id, model, version, base_url, user)
        deadline = time.monotonic() + timeout_s
        while True:
            caps = self.device(device_id).capabilities
            have = {(m.name, v.version) for m in caps.installed for v in m.versions} if caps else set()
            if all(w in have for w in wanted):
                return wanted
            for d in caps.deliveries if caps else []:
                if (d.model, d.version) in wanted and d.state == "failed" and d.ts >= started - 5:
                    raise PlacementInvalid(
                        f"delivering {d.model} {d.version} to {device_id} failed: {d.error}"
                    )
            if time.monotonic() > deadline:
                raise PlacementInvalid(f"{device_id} did not install {wanted} within {timeout_s:g} s")
            await asyncio.sleep(0.2)  # status arrives over MQTT; checked a few times a second

    def installed_on(self) -> dict[tuple[str, str], list[str]]:
        """(model, version) -> the devices whose last status lists it installed."""
        out: dict[tuple[str, str], list[str]] = {}
        for device_id, device in sorted(self.fleet.devices.items()):
            for model in device.capabilities.installed if device.capabilities else []:
                for entry in model.versions:
                    out.setdefault((model.name, entry.version), []).append(device_id)
        return out

    async def auto_place(self, device_id: str, user: str) -> tuple[Placement, Tracking]:
        device = self.device(device_id)
        tenants = device.editable_tenants()
        if not tenants:
            raise PlacementInvalid("the device runs no tenant to auto-place")
        return await self.publish_placement(device_id, auto_tenants(tenants), user, "auto")

    async def move_model(
        self,
        model: str,
        from_backend: str,
        to_backend: str,
        to_device: str | None,
        from_device: str | None,
        user: str,
        only: set[str] | None = None,
    ) -> MoveOutcome:
        """Publish a new placement to every device that runs `model` on `from_backend` (of `only`)."""
        outcome = MoveOutcome([], [])
        jobs: list[tuple[str, list[TenantSpec]]] = []
        for device_id, device in sorted(self.fleet.devices.items()):
            if only is not None and device_id not in only:
                continue
            try:
                moved = move_tenants(
                    device.editable_tenants(),
                    device.capabilities,
                    model,
                    from_backend,
                    to_backend,
                    to_device,
                    from_device,
                )
            except PlacementInvalid as exc:
                outcome.skipped.append({"device_id": device_id, "reason": str(exc)})
                continue
            if moved is not None:
                jobs.append((device_id, moved))
        limit = asyncio.Semaphore(64)  # QoS 1 acks in flight at once

        async def one(device_id: str, tenants: list[TenantSpec]) -> None:
            async with limit:
                try:
                    doc, _ = await self.publish_placement(device_id, tenants, user, "move", check=False)
                except (PublishFailed, PlacementInvalid, UnknownDevice) as exc:
                    log.warning("move: %s skipped: %s", device_id, exc)
                    outcome.skipped.append({"device_id": device_id, "reason": str(exc) or type(exc).__name__})
                    return
                outcome.published.append({"device_id": device_id, "generation": doc.generation})

        await asyncio.gather(*(one(d, t) for d, t in jobs))
        outcome.published.sort(key=lambda r: r["device_id"])
        outcome.skipped.sort(key=lambda r: r["device_id"])
        return outcome

"""The agent daemon: builds the parts, starts them in order, and stops them in order.

    MQTT session -> router (frames) -> tenants -> outbox -> MQTT
                 -> reconciler (placements) -> tenant table <- reporting (status, telemetry, stalls)

Router, placement and reporting never import one another: they meet in the tenant table and here.
Event loop: receives messages, validates them cheaply, routes frames to tenant queues, publishes.
Worker threads: decode, preprocess and infer (tenants), write SQLite (metrics), load models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from agent.frames.deadline import call_with_deadline
from agent.frames.pool import PoolMembers
from agent.frames.router import FrameRouter
from agent.frames.tenant import Tenant
from agent.frames.tenant_table import TenantTable
from agent.observability.homeassistant import HomeAssistant
from agent.observability.metrics import MetricsStore
from agent.observability.reporting import Reporter
from agent.placement.intake import Intake
from agent.placement.reconciler import Reconciler
from agent.protocol.delivery import DeliveryEvent, DeliveryProgress
from agent.protocol.schemas import Capabilities, Placement, TenantSpec
from agent.protocol.signing import load_public_keys
from agent.protocol.topics import BROKER_DROPPED, Topics
from agent.service import memory
from agent.service.capabilities import probe_backends_cached
from agent.service.config import AgentConfig, ConfigError
from agent.service.delivery import Deliverer
from agent.service.errors import PlacementRefused
from agent.service.model_repo import Model, ModelRepository
from agent.service.mqtt_session import MqttSession
from agent.service.outbox import Outbox, OutboxStore
from agent.service.sd_notify import notify, watchdog_interval_s, watchdog_loop
from backends.base import Backend

log = logging.getLogger(__name__)
# The runtimes' probe (a child process, agent/service/capabilities.py) gets this long at start, retries
# included; a hung device or driver then leaves the agent starting without capabilities.
PROBE_TIMEOUT_S = 60.0


def apply_cpu_policy(policy: str) -> None:
    """`scheduler.cpu_policy`: this thread (and every thread it starts) under SCHED_BATCH, whose
    wake-ups do not preempt a running thread; where the OS has no such policy, logged and ignored."""
    if policy != "batch":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        log.warning("scheduler.cpu_policy = batch: not applied (%s); the default policy stays", exc)


class Agent:
    def __init__(self, config: AgentConfig, backend_options: dict[str, dict[str, Any]] | None = None) -> None:
        self.config = config
        self.topics = Topics(config.device_id, config.broker.topic_prefix)
        self.repo = ModelRepository(config.models_dir, config.versions_dir)
        # Extra options per backend name (tests give the fake backend its delay here).
        self.backend_options = backend_options or {}
        key = config.security.placement_public_key
        try:
            public_key = load_public_keys(key) if key is not None else None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"security.placement_public_key: {exc}") from exc
        self.table = TenantTable()
        self.router = FrameRouter(self.topics, config.ingest, self.table, config.broker.results_qos)
        self.reporter = Reporter(
            config,
            self.topics,
            self.table,
            rejected=lambda: self.router.rejected,
            duplicates=lambda: self.router.duplicates,
            mqtt_protocol=lambda: self.session.protocol,
            mqtt_broker=lambda: self.session.broker,
        )
        self.reconciler = Reconciler(
            config,
            self.table,
            self.repo,
            make_tenant=self._make_tenant,
            probe=self._probe_capabilities,
            note_error=self.reporter.note_error,
            extend_start=self._extend_start,
            intake=Intake(public_key, config.security.placement_max_age_s),
            publish_event=self._publish_event,
        )
        self.metrics = MetricsStore(
            config.metrics_db,
            config.metrics.retention_hours * 3600.0,
            config.metrics.flush_interval_s,
            max_bytes=int(config.metrics.max_db_mb * 1024 * 1024),
        )
        self.ready = asyncio.Event()  # initial placement loaded (systemd READY=1)
        self._tasks: list[asyncio.Task[Any]] = []  # long-lived: session, outbox, telemetry, status...
        self.session = MqttSession(
            config.broker,
            config.broker.client_id or f"edge-agent-{config.device_id}",
            will_topic=self.topics.status,
            will_payload=self.reporter.offline_payload(),
            on_connect=self._on_connect,
        )
        # QoS 2 end to end when results are: a QoS 2 camera's frame then arrives once, too.
        frames_qos = config.broker.results_qos
        self.session.subscribe(self.topics.infer, self.router.on_frame, qos=frames_qos)
        self.session.subscribe(self.topics.infer_any_model, self.router.on_frame, qos=frames_qos)
        self.session.subscribe(self.topics.placement, lambda m: self.reconciler.submit(m.payload), qos=1)
        # Model versions the console delivers (docs/fleet.md).
        self.deliverer = Deliverer(
            config.models,
            self.repo,
            public_key,
            config.security.placement_max_age_s,
            report=self._delivery_report,
            placed=lambda: {(t.model.name, t.model.manifest.version) for t in self.table.live()},
        )
        self.session.subscribe(self.topics.models, lambda m: self.deliverer.submit(m.payload), qos=1)
        # Where the broker tells (Mosquitto, unless an ACL hides $SYS): frames it dropped unseen.
        self.session.subscribe(BROKER_DROPPED, self.reporter.on_broker_dropped, qos=0)
        # [[inputs]]: other topics (a camera's, Frigate's snapshots) whose frames a model serves.
        for source in config.inputs:
            self.session.subscribe(source.topic, self.router.input_handler(source.model), qos=source.qos)
        # Device pools (docs/pools.md): shares joined and left as placed, on their own connection.
        self.pools = PoolMembers(config.device_id, self.table, self.router, self._pool_session)
        self.homeassistant: HomeAssistant | None = None
        if config.homeassistant.enabled:  # MQTT discovery (docs/home-assistant.md)
            self.homeassistant = HomeAssistant(config.homeassistant, self.topics, self.table, self.session)
            self.homeassistant.subscribe()
            self.router.answer_hooks.append(self.homeassistant.observe)
        self.outbox: Outbox | None = None
        self.frigate: Any = None
        if config.frigate.enabled:  # Frigate's zmq detector (docs/frigate.md): pyzmq loaded only then
            from agent.frigate.server import FrigateServer

            self.frigate = FrigateServer(
                config.frigate,
                self.table,
                lambda: self.router.accepting,
                config.state_dir / "frigate-models",
                repo=self.repo,
                place=self._place_for_frigate,
            )

    def _pool_session(self) -> MqttSession:
        """Pool frames come on a second connection without a session: a member that dies is then
        handed no more frames (agent/frames/pool.py gives the measurement)."""
        broker = self.config.broker
        cfg = broker.model_copy(update={"session_expiry_s": 0})
        client_id = broker.client_id or f"edge-agent-{self.config.device_id}"
        return MqttSession(cfg, f"{client_id}-pool", None, b"")

    async def _place_for_frigate(self, model: str, version: str) -> str | None:
        """Add a tenant of a model Frigate sent to this device's placement (generation + 1, as a local
        edit would); why not, or None once it serves. A device taking signed placements only refuses:
        its placements come from whoever holds the key (docs/frigate.md#models-frigate-sends)."""
        if self.config.security.placement_public_key is not None:
            return "this device applies signed placements only: place the model from the console"
        saved = await asyncio.to_thread(self.reconciler.saved)
        keep = [t for t in (saved.tenants if saved is not None else []) if t.model != model]
        spec = TenantSpec(
            model=model,
            version=version,
            backend=self.config.frigate.transferred_backend,
            device=self.config.frigate.transferred_device,
        )
        generation = max(self.table.applied_generation or 0, saved.generation if saved else 0) + 1
        try:
            await self.reconciler.apply(
                Placement(generation=generation, tenants=[*keep, spec]), source="frigate"
            )
        except PlacementRefused as exc:
            return f"placement refused: {exc}"
        return None

    def _publish_event(self, event: bytes) -> None:
        """Failovers are announced on edge/<id>/events (not retained), through the outbox once it runs."""
        if self.outbox is not None:
            self.outbox.put(self.topics.events, event, qos=1)

    def _delivery_report(self, progress: DeliveryProgress, announce: bool) -> None:
        """A delivery's progress in status (the last few), its start and outcome on events."""
        caps = self.table.capabilities
        others = [d for d in caps.deliveries if (d.model, d.version) != (progress.model, progress.version)]
        update: dict[str, Any] = {"deliveries": [*others[-7:], progress]}
        if progress.state == "installed":
            update.update(installed=self.repo.installed(), models=self.repo.names())
        self.table.set_capabilities(caps.model_copy(update=update))
        self.table.touch()
        if announce:
            event = DeliveryEvent(**progress.model_dump(), device_id=self.config.device_id)
            self._publish_event(event.model_dump_json().encode())

    def _make_tenant(self, spec: TenantSpec, model: Model, backend: Backend) -> Tenant:
        scheduler, ingest = self.config.scheduler, self.config.ingest
        return Tenant(
            spec,
            model,
            backend,
            self.router.emit,
            queue_depth=scheduler.queue_depth,
            overload_policy=scheduler.overload_policy,
            max_pixels=ingest.max_pixels,
            top_k=ingest.top_k,
            record=self.metrics.record,
            backend_options=self.backend_options.get(spec.backend),
        )

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Everything up to serving: state dir, metrics, capabilities, initial placement, MQTT."""
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.config.state_dir.mkdir, parents=True, exist_ok=True)
        store = OutboxStore(self.config.state_dir / "outbox.db")
        unsent = await asyncio.to_thread(store.load)
        self.outbox = Outbox(self.session, loop, store, unsent)
        self.router.outbox = self.outbox
        await asyncio.to_thread(self.metrics.start)
        # A wedged device can hang its runtime's probe: start without it rather than never (systemd
        # would kill a start that takes minutes). Placements list devices again, under a deadline.
        probe_s = PROBE_TIMEOUT_S
        self._extend_start(probe_s)
        try:
            self.table.set_capabilities(await call_with_deadline(self._probe_capabilities, probe_s, None))
        except TimeoutError:
            self.table.set_capabilities(Capabilities(models=await asyncio.to_thread(self.repo.names)))
            self.reporter.note_error(
                f"probing the backends took over {probe_s:g} s (a device or driver may be hung)"
            )
        saved = await asyncio.to_thread(self.reconciler.saved)
        try:
            await self.reconciler.apply(
                saved or self.config.placement, source="saved" if saved is not None else "config"
            )
        except PlacementRefused as exc:
            self.reporter.note_error(f"initial placement refused: {exc}")
        self.ready.set()
        self._tasks = [
            asyncio.create_task(self.session.run(), name="mqtt"),
            asyncio.create_task(self.outbox.run(), name="outbox"),
            asyncio.create_task(self.reporter.telemetry_loop(self.outbox), name="telemetry"),
            asyncio.create_task(self.reporter.status_loop(self.session), name="status"),
            asyncio.create_task(self.reporter.stall_loop(), name="stalls"),
            asyncio.create_task(self.reconciler.health_loop(), name="health"),
            asyncio.create_task(memory.trim_loop(), name="memory"),
            asyncio.create_task(self.pools.run(), name="pools"),
        ]
        if self.homeassistant is not None:
            self._tasks.append(asyncio.create_task(self.homeassistant.run(), name="homeassistant"))
        if self.config.metrics.prometheus_listen:
            from agent.observability.prometheus import serve

            self._tasks.append(
                asyncio.create_task(
                    serve(self.config.metrics.prometheus_listen, self.reporter), name="prometheus"
                )
            )
        if self.frigate is not None:  # cancelled with the others, after the tenants drained
            self.frigate.bind()
            self._tasks.append(asyncio.create_task(self.frigate.run(), name="frigate"))
        interval = watchdog_interval_s()
        if interval is not None:
            self._tasks.append(asyncio.create_task(watchdog_loop(interval), name="watchdog"))
        tenants = ", ".join(t.name for t in self.table.serving()) or "no tenants"
        notify(f"READY=1\nSTATUS=serving {tenants}")

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        stop_task = asyncio.create_task(stop.wait())
        # A crashed internal task is a bug: stop (non-zero exit) rather than limp on.
        done, _ = await asyncio.wait([stop_task, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in done if t is not stop_task and t.exception() is not None]
        stop_task.cancel()
        await self.shutdown()
        if crashed:
            raise RuntimeError(f"internal task {crashed[0].get_name()} failed") from crashed[0].exception()

    async def shutdown(self) -> None:
        """Stop taking frames, answer what is queued, publish the final status, flush SQLite."""
        await self.pools.stop()  # leave pools first: their frames go to the other members
        self.router.accepting = False
        notify("STOPPING=1\nSTATUS=draining queued frames")
        await self.reconciler.stop_applying()
        timeout = self.config.scheduler.drain_timeout_s
        # drain() runs once per tenant: those already draining are waited for, not drained twice.
        await asyncio.gather(*(asyncio.to_thread(t.drain, timeout) for t in self.table.live()))
        if self.outbox is not None and self.session.connected.is_set():
            await self.outbox.flush(timeout_s=5.0)
        # Nothing may publish "online" after the final offline status below.
        loops = [t for t in self._tasks if t.get_name() in ("status", "telemetry", "stalls")]
        await _cancel(loops)
        await self.session.stop(final=(self.topics.status, self.reporter.offline_payload()))
        await _cancel(self._tasks)
        await self.reconciler.cancel_background()
        await self.deliverer.stop()
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.close)
        await asyncio.to_thread(self.metrics.stop)
        log.info("stopped")

    # -- helpers ----------------------------------------------------------------------------------
    def _probe_capabilities(self) -> Capabilities:
        """Which runtimes and devices this machine has, probed in a child process (blocking: the
        runtimes ask their drivers); agent/service/capabilities.py says why a child."""
        cache = self.config.state_dir / "capabilities.json"
        return Capabilities(
            backends=probe_backends_cached(cache), models=self.repo.names(), installed=self.repo.installed()
        )

    def _extend_start(self, seconds: float) -> None:
        """Before READY, tell systemd a step may take `seconds` (its TimeoutStartSec would otherwise
        restart an agent whose first TensorRT build, or a deadline on a hung device, runs long)."""
        if not self.ready.is_set():
            notify(f"EXTEND_TIMEOUT_USEC={int((seconds + 30.0) * 1_000_000)}")

    async def _on_connect(self) -> None:
        self.table.touch()  # (re)publish the retained status on every connect


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

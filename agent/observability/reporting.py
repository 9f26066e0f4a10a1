"""Reporting: the retained status, periodic telemetry and the stall watch. Reads the tenant table only.

Payloads are those of docs/protocol.md ("Status", "Telemetry"). Errors worth an operator's eye
(refusals, failed loads, stalls) are kept, time-stamped, in `status.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping

from agent import __version__
from agent.frames.tenant_table import TenantTable
from agent.observability.device_stats import DeviceStats
from agent.protocol.schemas import (
    DeviceCounters,
    DeviceTelemetry,
    PlacementStatus,
    Status,
    Telemetry,
    TenantState,
    TenantTelemetry,
)
from agent.protocol.topics import Topics
from agent.service.config import AgentConfig
from agent.service.mqtt_session import Incoming, MqttSession
from agent.service.outbox import Outbox

log = logging.getLogger(__name__)


class Reporter:
    def __init__(
        self,
        config: AgentConfig,
        topics: Topics,
        table: TenantTable,
        rejected: Callable[[], Mapping[str, int]],
        duplicates: Callable[[], int] = lambda: 0,
        mqtt_protocol: Callable[[], str] = lambda: "5",
        mqtt_broker: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.config = config
        self.topics = topics
        self.table = table
        self.rejected = rejected  # frames refused before a tenant, by error code
        self.duplicates = duplicates  # frames not run again (a repeated request id)
        self.mqtt_protocol = mqtt_protocol
        self.mqtt_broker = mqtt_broker  # the broker node connected to (host:port)
        self.started_at = time.time()
        self.errors: deque[str] = deque(maxlen=20)
        self.device_stats = DeviceStats()
        self.broker_dropped: int | None = None
        self.session: MqttSession | None = None  # set by status_loop

    def on_broker_dropped(self, message: Incoming) -> None:
        """The broker's own count of dropped publishes ($SYS), where it publishes one."""
        with contextlib.suppress(ValueError):
            self.broker_dropped = int(message.payload)

    def note_error(self, message: str) -> None:
        """Log it and keep it, time-stamped, in status.errors (the console's error list)."""
        log.warning("%s", message)
        self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}")
        self.table.touch()

    def status(self) -> Status:
        return Status(
            online=True,
            device_id=self.config.device_id,
            agent_version=__version__,
            started_at=self.started_at,
            capabilities=self.table.capabilities,
            placement=PlacementStatus(
                generation=self.table.generation,
                applied_generation=self.table.applied_generation,
                tenants=self.table.statuses(),
                refused=self.table.refused,
            ),
            errors=list(self.errors),
            mqtt_protocol=self.mqtt_protocol(),
            mqtt_broker=self.mqtt_broker(),
            tags=dict(self.config.tags),
        )

    def offline_payload(self) -> bytes:
        """The last will and the final status: `{"online": false}`."""
        return json.dumps({"online": False, "device_id": self.config.device_id}).encode()

    def telemetry(self) -> Telemetry:
        window = self.config.metrics.telemetry_interval_s
        tenants = [
            TenantTelemetry(
                model=t.spec.tenant_key(),  # two versions of one model are two tenants
                version=t.model.manifest.version,
                backend=t.spec.backend,
                device=t.device,
                instances=t.spec.instances,
                state=t.state,
                queue_depth=len(t.queue),
                failovers=self.table.failover_counts[t.spec.tenant_key()],
                last_detections=t.last_detections,
                **t.stats.snapshot(window).model_dump(),  # counters and the window's figures
            )
            for t in self.table.serving()
        ]
        return Telemetry(
            device_id=self.config.device_id,
            interval_s=window,
            tenants=tenants,
            device=DeviceTelemetry(
                cpu_percent=self.device_stats.cpu_percent(),
                rss_mb=self.device_stats.rss_mb(),
                temperature_c=self.device_stats.temperature_c(),
                load_1m=self.device_stats.load_1m(),
                **self.device_stats.telemetry_extras(self.config.state_dir),
            ),
            rejected=dict(self.rejected()),
            broker_dropped=self.broker_dropped,
            **self.device_counters().model_dump(),
        )

    def device_counters(self) -> DeviceCounters:
        """The agent's own counters, for telemetry and /metrics alike. `publishes_refused` is the
        MQTT session's count (the session status goes through, `status_loop`): 0 before it starts."""
        return DeviceCounters(
            duplicates=self.duplicates(),
            publishes_refused=int(getattr(self.session, "publishes_refused", 0) or 0),
        )

    # -- loops (started by the daemon, stopped before the final offline status) -------------------
    async def status_loop(self, session: MqttSession) -> None:
        """Publish the retained status whenever the table changed (coalesced, at most 5 per second)."""
        self.session = session
        changed = self.table.changed
        while True:
            await changed.wait()
            await session.connected.wait()
            changed.clear()
            with contextlib.suppress(Exception):
                await session.publish(
                    self.topics.status, self.status().model_dump_json().encode(), qos=1, retain=True
                )
            await asyncio.sleep(0.2)  # coalesce bursts of changes

    async def stall_loop(self) -> None:
        """Once a second: answer batches stuck in a hung runtime call (Tenant.check_stalls), and
        publish status when a tenant's state changes because instances stalled or recovered."""
        timeout = self.config.scheduler.infer_timeout_s
        seen: dict[str, tuple[TenantState, str | None]] = {}
        while True:
            await asyncio.sleep(1.0)
            for tenant in self.table.live():
                try:
                    tenant.check_stalls(timeout)
                except Exception:  # a bug here must not stop the agent (Agent.run stops on a crash)
                    log.exception("stall check of tenant %s failed", tenant.name)
            now = {t.name: (t.state, t.error) for t in self.table.serving()}
            for name, (_state, error) in now.items():
                if error and seen.get(name, (None, None))[1] != error:
                    self.note_error(f"{name}: {error}")  # kept in status.errors, with the time
            if now != seen:
                seen = now
                self.table.touch()

    async def telemetry_loop(self, outbox: Outbox) -> None:
        """Telemetry goes through the outbox: spooled while the broker is away, then sent in order.

        QoS 1 (docs/protocol.md): a QoS 0 message written into a connection that has silently died
        is lost; acknowledged delivery is what makes the spool survive a network cut.
        """
        while True:
            await asyncio.sleep(self.config.metrics.telemetry_interval_s)
            outbox.put(self.topics.telemetry, self.telemetry().model_dump_json().encode(), qos=1)

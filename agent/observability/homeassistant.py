"""Home Assistant MQTT discovery (opt in: `[homeassistant] enabled = true`).

The agent appears in Home Assistant as one device with, per tenant (model), sensors for throughput,
p95 latency, the last top-1 label and its score, the error and drop counters and, with a latency
objective, the share of answers within it; plus a connectivity
binary sensor. Discovery configs are retained on
`<discovery_prefix>/<component>/edge_<device id>/<object id>/config` and follow HA's MQTT discovery
schema (docs/home-assistant.md); availability comes from the agent's own retained status and its
last will (`{"online": false}`). A tenant that stops being placed loses its entities: an empty
retained config removes an entity in HA. States are JSON on `<prefix>/<id>/ha/<model>/stats` (every
`state_interval_s`) and `<prefix>/<id>/ha/<model>/top` (at most once a second per model, when a
new result came).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.frames.tenant_table import TenantTable
from agent.protocol.topics import Topics, split_key, tenant_key
from agent.service.config import HomeAssistantConfig
from agent.service.mqtt_session import Incoming, MqttSession

log = logging.getLogger(__name__)

ONLINE_TEMPLATE = "{{ 'online' if value_json.online else 'offline' }}"


def slug(text: str) -> str:
    """An HA node/object id: [a-zA-Z0-9_-]+ (model names may hold dots)."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", text)


@dataclass(frozen=True)
class SensorDef:
    key: str
    name: str
    topic: str  # "stats" or "top"
    template: str
    extra: tuple[tuple[str, Any], ...] = ()


TENANT_SENSORS = (
    SensorDef(
        "fps",
        "throughput",
        "stats",
        "{{ value_json.fps }}",
        (("unit_of_measurement", "fps"), ("state_class", "measurement"), ("icon", "mdi:speedometer")),
    ),
    SensorDef(
        "latency_p95",
        "p95 latency",
        "stats",
        "{{ value_json.latency_p95_ms }}",
        (("device_class", "duration"), ("unit_of_measurement", "ms"), ("state_class", "measurement")),
    ),
    SensorDef("label", "last label", "top", "{{ value_json.label }}", (("icon", "mdi:tag-text"),)),
    SensorDef(
        "score",
        "last score",
        "top",
        "{{ value_json.score }}",
        (("state_class", "measurement"), ("suggested_display_precision", 3), ("icon", "mdi:percent")),
    ),
    SensorDef(
        "errors",
        "errors",
        "stats",
        "{{ value_json.errors }}",
        (("state_class", "total_increasing"), ("entity_category", "diagnostic"), ("icon", "mdi:alert")),
    ),
    SensorDef(
        "drops",
        "drops",
        "stats",
        "{{ value_json.drops }}",
        (("state_class", "total_increasing"), ("entity_category", "diagnostic"), ("icon", "mdi:delete")),
    ),
)

# Tenants with a latency objective only: the share of its answers in the window within it.
OBJECTIVE_SENSOR = SensorDef(
    "within_objective",
    "within objective",
    "stats",
    "{{ value_json.within_objective_pct }}",
    (("unit_of_measurement", "%"), ("state_class", "measurement"), ("icon", "mdi:timer-check")),
)


class HomeAssistant:
    """Announces entities, keeps them in step with the placement, publishes their states."""

    def __init__(
        self, config: HomeAssistantConfig, topics: Topics, table: TenantTable, session: MqttSession
    ) -> None:
        self.config = config
        self.topics = topics
        self.table = table
        self.session = session
        self.node = slug(f"edge_{topics.device_id}")
        self.announced: dict[str, list[str]] = {}  # model -> its config topics, published
        self.retained: set[str] = set()  # config topics under our node the broker holds
        self.last_top: dict[str, tuple[str, float, str]] = {}  # model -> (label, score, request_id)
        self._top_sent: dict[str, tuple[str, float, str]] = {}
        self._refresh = asyncio.Event()

    # -- wiring -------------------------------------------------------------------------------------
    def subscribe(self) -> None:
        prefix = self.config.discovery_prefix
        self.session.subscribe(f"{prefix}/status", self.on_ha_status, qos=1)
        self.session.subscribe(f"{prefix}/+/{self.node}/+/config", self.on_retained_config, qos=1)

    def on_ha_status(self, message: Incoming) -> None:
        """HA says "online" when it (re)starts: announce again (HA's documented birth message)."""
        if message.payload.strip() == b"online":
            self.announced.clear()
            self._refresh.set()

    def on_retained_config(self, message: Incoming) -> None:
        """Configs the broker holds for this device, ours from before included (stale ones go)."""
        if message.payload:
            self.retained.add(message.topic)
        else:
            self.retained.discard(message.topic)

    def observe(self, frame: object, outcome: Any) -> None:
        """Every answer (the router's hook, on the thread that made it): keep the newest top-1 per
        model, a classification's best class or a detection's best box; the loop throttles."""
        best = (getattr(outcome, "top", None) or getattr(outcome, "detections", None) or [None])[0]
        if best is not None:
            self.last_top[self._key_of(outcome)] = (best.label, float(best.score), outcome.request_id)

    def _key_of(self, outcome: Any) -> str:
        """The tenant key that served an answer: its `model` is what the frame asked for (`name`
        may have reached a pinned tenant, keyed `name@version`)."""
        version = getattr(outcome, "version", None)
        if version is None or outcome.model in self.announced:
            return str(outcome.model)
        name = split_key(outcome.model)[0]
        pinned = tenant_key(name, version)
        return pinned if pinned in self.announced else name

    # -- payloads -----------------------------------------------------------------------------------
    def device(self) -> dict[str, Any]:
        return {
            "identifiers": [self.node],
            "name": f"edge-agent {self.topics.device_id}",
            "manufacturer": "edge-agent",
            "model": "edge-agent inference agent",
            "sw_version": __version__,
        }

    def _common(self) -> dict[str, Any]:
        return {
            "device": self.device(),
            "origin": {"name": "edge-agent", "sw_version": __version__},
            "availability": [{"topic": self.topics.status, "value_template": ONLINE_TEMPLATE}],
            "qos": 1,
        }

    def state_topic(self, model: str, kind: str) -> str:
        return f"{self.topics.prefix}/{self.topics.device_id}/ha/{model}/{kind}"

    def config_topic(self, component: str, object_id: str) -> str:
        return f"{self.config.discovery_prefix}/{component}/{self.node}/{object_id}/config"

    def device_configs(self) -> dict[str, dict[str, Any]]:
        common = self._common()
        del common["availability"]  # connectivity is what this one shows: never "unavailable"
        return {
            self.config_topic("binary_sensor", "online"): {
                **common,
                "name": "online",
                "unique_id": f"{self.node}_online",
                "device_class": "connectivity",
                "entity_category": "diagnostic",
                "state_topic": self.topics.status,
                "value_template": "{{ 'ON' if value_json.online else 'OFF' }}",
            }
        }

    def tenant_configs(self, model: str) -> dict[str, dict[str, Any]]:
        out = {}
        tenant = self.table.get(model)
        objective = tenant is not None and tenant.placed.latency_objective_ms is not None
        for sensor in (*TENANT_SENSORS, OBJECTIVE_SENSOR) if objective else TENANT_SENSORS:
            object_id = slug(f"{model}_{sensor.key}")
            doc: dict[str, Any] = {
                **self._common(),
                "name": f"{model} {sensor.name}",
                "unique_id": f"{self.node}_{object_id}",
                "state_topic": self.state_topic(model, sensor.topic),
                "value_template": sensor.template,
                **dict(sensor.extra),
            }
            if sensor.key == "label":
                doc["json_attributes_topic"] = self.state_topic(model, "top")
            out[self.config_topic("sensor", object_id)] = doc
        return out

    def stats_state(self, model: str) -> dict[str, Any] | None:
        """The tenant's stats state. With no result in the window the p95 is null: its template
        renders "None", which HA's MQTT sensor takes as unknown, not as a 0 ms latency that
        long-term statistics would average in."""
        tenant = self.table.get(model)
        if tenant is None:
            return None
        snap = tenant.stats.snapshot(self.config.state_interval_s)
        share = snap.objective_share
        return {
            "fps": round(snap.fps, 2),
            "latency_p95_ms": round(snap.latency_ms.p95, 2) if snap.latency_samples else None,
            "errors": snap.errors,
            "drops": snap.drops,
            "frames_out": snap.frames_out,
            "within_objective_pct": None if share is None else round(100.0 * share, 2),
        }

    # -- the loop -----------------------------------------------------------------------------------
    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        with contextlib.suppress(Exception):
            await self.session.publish(topic, payload, qos=1, retain=retain)

    async def sync(self) -> None:
        """Announce new models, remove entities of models no longer placed (and stale ones)."""
        serving = set(self.table.served_models())
        keep = serving | set(self.table.failed_models())  # a model still loading keeps its entities
        wanted: set[str] = set(self.device_configs())
        if "__device__" not in self.announced:
            for topic, doc in self.device_configs().items():
                await self._publish(topic, json.dumps(doc).encode(), retain=True)
            self.announced["__device__"] = list(self.device_configs())
        for model in sorted(serving):
            configs = self.tenant_configs(model)
            wanted.update(configs)
            if sorted(configs) != sorted(self.announced.get(model, [])):  # new, or its objective changed
                for topic, doc in configs.items():
                    await self._publish(topic, json.dumps(doc).encode(), retain=True)
                self.announced[model] = list(configs)
                log.info("home assistant: announced %d entities of %s", len(configs), model)
        for model in [m for m in self.announced if m != "__device__" and m not in keep]:
            for topic in self.announced.pop(model):
                await self._publish(topic, b"", retain=True)
            for kind in ("stats", "top"):
                await self._publish(self.state_topic(model, kind), b"", retain=True)
            self.last_top.pop(model, None)
            self._top_sent.pop(model, None)
            log.info("home assistant: removed the entities of %s", model)
        if self.table.applied_generation is not None:  # a placement is in force: the rest is stale
            kept = {t for m in keep for t in self.tenant_configs(m)}
            for topic in sorted(self.retained - wanted - kept):
                await self._publish(topic, b"", retain=True)
                self.retained.discard(topic)

    async def run(self) -> None:
        """Once a second: entities in step, new top-1s; every `state_interval_s`: the stats."""
        next_stats = 0.0
        while True:
            await self.session.connected.wait()
            await self.sync()
            for model in list(self.announced):
                top = self.last_top.get(model)
                if top is not None and top != self._top_sent.get(model):
                    self._top_sent[model] = top
                    doc = {
                        "label": top[0],
                        "score": round(top[1], 4),
                        "request_id": top[2],
                        "ts": time.time(),
                    }
                    topic = self.state_topic(model, "top")
                    await self._publish(topic, json.dumps(doc).encode(), retain=True)
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.config.state_interval_s
                for model in list(self.announced):
                    state = self.stats_state(model) if model != "__device__" else None
                    if state is not None:
                        await self._publish(
                            self.state_topic(model, "stats"), json.dumps(state).encode(), retain=True
                        )
            self._refresh.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), 1.0)

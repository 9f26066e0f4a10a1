"""Home Assistant MQTT discovery on a real broker: retained configs checked against HA's discovery
schema (keys, ids, device, availability), templates rendered against the real state payloads as HA
would, states that follow the frames, removed tenants' entities removed."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable
from typing import Any

import jinja2
import paho.mqtt.client as paho

from agent.commands.client import publish_placement
from agent.devtools.local_broker import LocalBroker
from tests.conftest import CAT_CLASSES, AgentProcess, Collector, sample

# HA's MQTT discovery schema (homeassistant/components/mqtt: the entity schema shared by every
# platform, and sensor / binary_sensor's own keys), full names.
COMMON_KEYS = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "default_entity_id",
    "device",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "origin",
    "payload_available",
    "payload_not_available",
    "qos",
    "unique_id",
}
PLATFORM_KEYS = {
    "sensor": {
        "device_class",
        "expire_after",
        "force_update",
        "last_reset_value_template",
        "options",
        "state_class",
        "state_topic",
        "suggested_display_precision",
        "unit_of_measurement",
        "value_template",
    },
    "binary_sensor": {
        "device_class",
        "expire_after",
        "force_update",
        "off_delay",
        "payload_off",
        "payload_on",
        "state_topic",
        "value_template",
    },
}
DEVICE_KEYS = {
    "configuration_url",
    "connections",
    "hw_version",
    "identifiers",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "serial_number",
    "suggested_area",
    "sw_version",
    "via_device",
}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
ENTITY_CATEGORIES = {"config", "diagnostic"}
# device_class -> units HA accepts for it (sensor: duration; binary_sensor: connectivity)
DEVICE_CLASS_UNITS = {
    ("sensor", "duration"): {"d", "h", "min", "s", "ms", "µs"},
    ("binary_sensor", "connectivity"): {None},
}
CONFIG_TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor)/([a-zA-Z0-9_-]+)/([a-zA-Z0-9_-]+)/config$")

HA_CONFIG = "[homeassistant]\nenabled = true\nstate_interval_s = 1\n"
JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined)


def render(template: str, payload: bytes) -> str:
    """A value template as HA renders it: `value` is the payload, `value_json` its JSON."""
    text = payload.decode()
    return JINJA.from_string(template).render(value=text, value_json=json.loads(text)).strip()


def check_config(topic: str, doc: dict[str, Any]) -> None:
    """The checks HA's discovery applies to a config, as far as they can be made without HA."""
    found = CONFIG_TOPIC.match(topic)
    assert found, topic
    platform = found.group(1)
    unknown = set(doc) - COMMON_KEYS - PLATFORM_KEYS[platform]
    assert not unknown, f"{topic}: keys HA's {platform} schema does not have: {unknown}"
    assert (
        isinstance(doc["state_topic"], str)
        and "+" not in doc["state_topic"]
        and "#" not in doc["state_topic"]
    )
    assert isinstance(doc["name"], str) and doc["name"]
    assert isinstance(doc["unique_id"], str) and doc["unique_id"]
    device = doc["device"]
    assert set(device) <= DEVICE_KEYS and device["identifiers"] and isinstance(device["identifiers"], list)
    assert set(doc["origin"]) <= ORIGIN_KEYS and doc["origin"]["name"]
    for item in doc.get("availability", []):
        assert set(item) <= AVAILABILITY_KEYS and "topic" in item
    assert doc.get("state_class") in STATE_CLASSES | {None}
    assert doc.get("entity_category") in ENTITY_CATEGORIES | {None}
    assert doc.get("qos", 0) in (0, 1, 2)
    if "device_class" in doc:
        units = DEVICE_CLASS_UNITS[(platform, doc["device_class"])]
        assert doc.get("unit_of_measurement") in units, doc
    for key in ("value_template", "availability_template"):
        if key in doc:
            JINJA.parse(doc[key])  # a template HA can compile


class Retained:
    """What a fresh subscriber gets now: the broker's retained messages under a filter."""

    def __init__(self, port: int, filter_: str) -> None:
        self.messages: dict[str, bytes] = {}
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        done: list[bool] = []
        client.on_message = lambda _c, _u, m: (
            self.messages.__setitem__(m.topic, m.payload) if m.retain else None
        )
        client.on_subscribe = lambda *_: done.append(True)
        client.on_connect = lambda c, *_: c.subscribe(filter_, qos=1)
        client.connect("127.0.0.1", port)
        client.loop_start()
        # After the SUBACK, one round trip through the broker (our own marker) ends the retained burst.
        marker = "edge-test/retained-marker"
        got_marker: list[bool] = []
        client.message_callback_add(marker, lambda *_: got_marker.append(True))
        client.subscribe(marker, qos=1)
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        client.publish(marker, b"x", qos=1).wait_for_publish(10)
        while not got_marker and time.monotonic() < deadline:
            time.sleep(0.01)
        client.loop_stop()
        client.disconnect()


def configs(c: Collector) -> dict[str, dict[str, Any]]:
    """The newest config per discovery topic; an empty payload (removed) as {}."""
    out: dict[str, dict[str, Any]] = {}
    for m in list(c.messages):
        if m.topic.startswith("homeassistant/") and m.topic.endswith("/config"):
            out[m.topic] = json.loads(m.payload) if m.payload else {}
    return out


def wait(c: Collector, predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with c._cond:
        while not predicate():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out: {what}"
            c._cond.wait(remaining)


def latest(c: Collector, topic: str) -> bytes | None:
    for m in reversed(c.messages):
        if m.topic == topic:
            return bytes(m.payload)
    return None


def test_discovery_configs_states_availability_and_removal(
    agent_factory: Callable[..., AgentProcess], broker: LocalBroker
) -> None:
    agent = agent_factory("ha1", config=HA_CONFIG)
    c = Collector(broker.port, ["homeassistant/#", "edge/ha1/ha/#", "edge/ha1/status"])
    agent.start()
    agent.wait_ready()
    lite0 = "homeassistant/sensor/edge_ha1/efficientnet-lite0_"
    wait(
        c,
        lambda: sum(t.startswith(lite0) and bool(d) for t, d in configs(c).items()) == 6,
        "6 tenant sensors",
    )
    wait(
        c, lambda: bool(configs(c).get("homeassistant/binary_sensor/edge_ha1/online/config")), "online sensor"
    )

    found = configs(c)
    assert len(found) == 7
    for topic, doc in found.items():
        check_config(topic, doc)
    assert len({d["unique_id"] for d in found.values()}) == 7  # unique per entity
    assert len({json.dumps(d["device"], sort_keys=True) for d in found.values()}) == 1  # one device
    # the retained broker copy is what HA reads at its start
    held = Retained(broker.port, "homeassistant/#").messages
    assert {t for t, p in held.items() if p} == set(found)

    # Availability from the agent's retained status, rendered as HA renders it.
    status = latest(c, "edge/ha1/status")
    assert status is not None
    sensor = found[lite0 + "fps/config"]
    (avail,) = sensor["availability"]
    assert avail["topic"] == "edge/ha1/status"
    assert render(avail["value_template"], status) == avail.get("payload_available", "online")

    # Idle: no result in the window, so no p95. The template renders "None", which HA's MQTT sensor
    # takes as unknown (a 0 ms reading would be averaged into its long-term statistics).
    p95_cfg = found[lite0 + "latency_p95/config"]
    wait(c, lambda: latest(c, p95_cfg["state_topic"]) is not None, "a stats state while idle")
    idle = latest(c, p95_cfg["state_topic"]) or b""
    assert json.loads(idle)["frames_out"] == 0
    assert render(p95_cfg["value_template"], idle) == "None"
    assert float(render(found[lite0 + "fps/config"]["value_template"], idle)) == 0

    # Frames flow: the states follow (label throttled, stats every state_interval_s).
    c.publish("edge/ha1/infer", sample("cat.jpg"))
    c.publish("edge/ha1/infer", sample("cat.jpg"))
    c.publish("edge/ha1/infer", b"junk")  # a tenant error
    label_cfg, stats_cfg = found[lite0 + "label/config"], found[lite0 + "errors/config"]

    def label_is_cat() -> bool:
        payload = latest(c, label_cfg["state_topic"])
        return payload is not None and "cat" in render(label_cfg["value_template"], payload)

    wait(c, label_is_cat, "the last label: a cat")
    wait(
        c,
        lambda: (p := latest(c, stats_cfg["state_topic"])) is not None and json.loads(p)["frames_out"] >= 2,
        "stats after the frames",
    )
    for key in ("fps", "score", "errors", "drops"):
        cfg = found[f"{lite0}{key}/config"]
        payload = latest(c, cfg["state_topic"])
        assert payload is not None, key
        assert float(render(cfg["value_template"], payload)) >= 0, key  # numeric, as state_class wants
    assert (
        float(
            render(
                found[lite0 + "errors/config"]["value_template"], latest(c, stats_cfg["state_topic"]) or b""
            )
        )
        == 1
    )
    top = json.loads(latest(c, label_cfg["state_topic"]) or b"{}")
    assert 0 < top["score"] <= 1 and top["label"]
    online_cfg = found["homeassistant/binary_sensor/edge_ha1/online/config"]
    assert render(online_cfg["value_template"], status) == "ON"

    # A burst of results: the last label is published at most once a second per model.
    tops_before = sum(m.topic == label_cfg["state_topic"] for m in c.messages)
    for name in ("daisy.jpg", "espresso.jpg") * 6:
        c.publish("edge/ha1/infer", sample(name))
    wait(
        c,
        lambda: json.loads(latest(c, stats_cfg["state_topic"]) or b"{}").get("frames_out", 0) >= 14,
        "the burst served",
    )
    wait(c, lambda: sum(m.topic == label_cfg["state_topic"] for m in c.messages) > tops_before, "a new label")
    stamps = [
        json.loads(m.payload)["ts"] for m in c.messages if m.topic == label_cfg["state_topic"] and m.payload
    ]
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(stamps)), stamps
    # A window with results has a p95: numeric, in ms, as the duration device class wants.
    p95s = [
        render(p95_cfg["value_template"], m.payload)
        for m in list(c.messages)
        if m.topic == p95_cfg["state_topic"] and m.payload and json.loads(m.payload)["frames_out"] > 0
    ]
    numeric = [float(v) for v in p95s if v != "None"]
    assert numeric and all(v > 0 for v in numeric), p95s

    # A placement without lite0: its entities go (empty retained configs), lite1's come.
    applied, _ = asyncio.run(
        publish_placement(broker.url, "ha1", {"generation": 5, "tenants": [{"model": "efficientnet-lite1"}]})
    )
    assert applied
    lite1 = "homeassistant/sensor/edge_ha1/efficientnet-lite1_"
    wait(
        c, lambda: all(not d for t, d in configs(c).items() if t.startswith(lite0)), "lite0 entities removed"
    )
    wait(
        c, lambda: sum(t.startswith(lite1) and bool(d) for t, d in configs(c).items()) == 6, "lite1 entities"
    )
    held = Retained(broker.port, "homeassistant/#").messages
    assert not any(t.startswith(lite0) for t, p in held.items() if p)
    assert sum(t.startswith(lite1) for t, p in held.items() if p) == 6

    # The agent stops: its last status says offline, and so does every entity's availability.
    agent.stop()
    wait(
        c, lambda: json.loads(latest(c, "edge/ha1/status") or b"{}").get("online") is False, "offline status"
    )
    offline = latest(c, "edge/ha1/status") or b""
    assert render(avail["value_template"], offline) == "offline"
    assert render(online_cfg["value_template"], offline) == "OFF"
    c.close()


def test_discovery_is_off_unless_enabled(
    agent_factory: Callable[..., AgentProcess], broker: LocalBroker
) -> None:
    agent = agent_factory("ha2").start()
    agent.wait_ready()
    c = Collector(broker.port, ["edge/ha2/result"])
    c.publish("edge/ha2/infer", sample("cat.jpg"))
    result = c.wait_for(lambda r: len(r) >= 1, "edge/ha2/result")[-1]
    assert result["top"][0]["index"] in CAT_CLASSES
    held = Retained(broker.port, "homeassistant/#").messages
    assert not held
    c.close()

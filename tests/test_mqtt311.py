"""A broker that speaks only MQTT 3.1.1 (amqtt, from PyPI): the agent falls back and serves."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.devtools.local_broker import free_port, wait_for_port
from tests.conftest import SAMPLES, AgentProcess, sample

AMQTT = Path(sys.executable).with_name("amqtt")
pytestmark = pytest.mark.skipif(not AMQTT.exists(), reason="amqtt is not installed (pip install amqtt)")


class Amqtt:
    """amqtt's broker on a free loopback port: MQTT 3.1.1 only, a project this one did not write."""

    def __init__(self, workdir: Path) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        self.config = workdir / "amqtt.yaml"
        self.config.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )
        self.log = workdir / "amqtt.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> Amqtt:
        self.proc = subprocess.Popen(
            [str(AMQTT), "-c", str(self.config)], stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )
        wait_for_port(self.host, self.port, timeout_s=30)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)


class Client311:
    """A paho MQTT 3.1.1 client that keeps what it receives."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.subacks = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.wait(lambda: self.subacks >= len(topics), "SUBACKs")

    def _on_subscribe(self, *_: Any) -> None:
        with self.cond:
            self.subacks += 1
            self.cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((message.topic, bytes(message.payload)))
            self.cond.notify_all()

    def wait(self, predicate: Any, what: str, timeout: float = 60.0) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}; got {self.messages[-3:]}")

    def json_on(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p in self.messages if t == topic and p]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def amqtt(shared_dir: Path) -> Iterator[Amqtt]:
    broker = Amqtt(shared_dir).start()
    yield broker
    broker.stop()


def test_agent_serves_through_a_broker_that_speaks_only_mqtt_3_1_1(amqtt, tmp_path):
    agent = AgentProcess(amqtt, tmp_path, "v3dev").start()  # type: ignore[arg-type]
    c = Client311(amqtt.port, ["edge/v3dev/status", "edge/v3dev/result"])
    try:

        def online(_: object = None) -> bool:
            statuses = c.json_on("edge/v3dev/status")
            return bool(statuses) and statuses[-1].get("online") is True

        c.wait(online, "the agent's status (retained, over 3.1.1)")
        status = c.json_on("edge/v3dev/status")[-1]
        assert status["mqtt_protocol"] == "3.1.1"
        assert status["placement"]["tenants"][0]["state"] == "ready"

        # MQTT 3.1.1 has no properties: the JSON envelope carries the request id.
        envelope = {"request_id": "v3-1", "image_b64": base64.b64encode(sample("espresso.jpg")).decode()}
        c.client.publish("edge/v3dev/infer", json.dumps(envelope), qos=1).wait_for_publish(10)
        c.client.publish("edge/v3dev/infer", sample("daisy.jpg"), qos=1).wait_for_publish(10)
        c.wait(lambda: len(c.json_on("edge/v3dev/result")) >= 2, "two results")
        results = {r["request_id"]: r for r in c.json_on("edge/v3dev/result")}
        assert results["v3-1"]["top"][0]["label"] == "espresso"
        (other,) = (r for rid, r in results.items() if rid != "v3-1")
        assert other["top"][0]["label"] == "daisy" and len(other["request_id"]) == 32  # a generated id

        # A placement (retained) applies over 3.1.1 too.
        placement = {"generation": 5, "tenants": [{"model": "efficientnet-lite0", "instances": 2}]}
        c.client.publish("edge/v3dev/placement", json.dumps(placement), qos=1, retain=True).wait_for_publish(
            10
        )

        def applied(_: object = None) -> bool:
            statuses = c.json_on("edge/v3dev/status")
            p = statuses[-1].get("placement") or {} if statuses else {}
            return p.get("applied_generation") == 5 and [t["instances"] for t in p["tenants"]] == [2]

        c.wait(applied, "generation 5 applied")
        assert agent.stop() == 0
        c.wait(lambda _=None: c.json_on("edge/v3dev/status")[-1].get("online") is False, "the final status")
    finally:
        c.close()
        agent.stop()
    log = agent.log()
    assert log.count("does not speak MQTT 5: using MQTT 3.1.1") == 1, log[-2000:]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout
    )


def test_client_commands_work_through_a_3_1_1_only_broker(amqtt, tmp_path):
    """`edge-agent infer`, `status` and `place` fall back to MQTT 3.1.1 as the agent does: frames go
    as JSON envelopes and answers are matched by request id on the result topic."""
    agent = AgentProcess(amqtt, tmp_path, "v3cli").start()  # type: ignore[arg-type]
    try:
        c = Client311(amqtt.port, ["edge/v3cli/status"])
        c.wait(lambda: any(s.get("online") for s in c.json_on("edge/v3cli/status")), "the agent online")
        c.close()
        common = ["--broker", amqtt.url, "--device-id", "v3cli"]
        infer = _cli("infer", *common, "--json", str(SAMPLES / "espresso.jpg"), str(SAMPLES / "daisy.jpg"))
        assert infer.returncode == 0, infer.stdout + infer.stderr
        answers = [json.loads(line) for line in infer.stdout.splitlines() if line.startswith("{")]
        assert [a["top"][0]["label"] for a in answers] == ["espresso", "daisy"], infer.stdout
        status = _cli("status", *common)
        assert status.returncode == 0 and '"mqtt_protocol": "3.1.1"' in status.stdout, status.stdout
        place = _cli("place", *common, "--model", "efficientnet-lite0", "--instances", "2")
        assert place.returncode == 0 and "applied generation" in place.stdout, place.stdout + place.stderr
    finally:
        agent.stop()


def test_console_manages_an_agent_through_a_3_1_1_only_broker(amqtt, tmp_path):
    """The console falls back to MQTT 3.1.1 too: it sees the device and its placement edit applies."""
    from tests.test_console import ConsoleProcess, wait_until

    agent = AgentProcess(amqtt, tmp_path, "v3con").start()  # type: ignore[arg-type]
    workdir = tmp_path / "console"
    workdir.mkdir()
    console = ConsoleProcess(amqtt.url, workdir).start()  # waits for MQTT connected
    try:
        admin = console.client("admin")

        def device_ready() -> dict[str, Any] | None:
            status, data = admin.call("GET", "/api/devices/v3con")
            if status != 200 or not data["summary"].get("online"):
                return None
            return data if data["summary"]["tenants"] else None

        before = wait_until(device_ready, "the agent listed online by the console")
        body = {
            "tenants": [
                {"model": "efficientnet-lite0", "backend": "onnxruntime", "device": "cpu", "instances": 2}
            ]
        }
        status, data = admin.call("PUT", "/api/devices/v3con/placement", body)
        assert status == 200, data
        generation = data["generation"]
        assert generation == before["next_generation"]

        def applied() -> dict[str, Any] | None:
            detail = admin.get("/api/devices/v3con")
            return detail if detail["tracking"]["state"] == "applied" else None

        wait_until(applied, "the edit applied by the agent")
        assert "using MQTT 3.1.1" in console.log()
    finally:
        console.stop()
        agent.stop()

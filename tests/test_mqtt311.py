"""A broker that speaks only MQTT 3.1.1 (amqtt, from PyPI): the agent falls back and serves."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.devtools.local_broker import free_port, wait_for_port
from tests.conftest import SAMPLES, AgentProcess, sample

if TYPE_CHECKING:
    from tests.test_console import ConsoleProcess

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


@pytest.fixture(scope="module")
def amqtt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Amqtt]:
    broker = Amqtt(tmp_path_factory.mktemp("amqtt")).start()
    yield broker
    broker.stop()


class Served:
    """The module's agent on amqtt, and a console started beside it (its own MQTT 5 attempts wait
    out while the agent's do)."""

    def __init__(self, agent: AgentProcess, console: ConsoleProcess, starting: Future[Any]) -> None:
        self.agent = agent
        self._console = console
        self._starting = starting

    def console(self) -> ConsoleProcess:
        self._starting.result(timeout=120)  # re-raises what start() raised (it waits for /healthz)
        return self._console


@pytest.fixture(scope="module")
def served(amqtt: Amqtt, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One agent (device v3dev) and one console on amqtt for the whole module (each start loads a
    model or waits out MQTT 5 timeouts): the agent, CLI and console tests all talk to them. The
    teardown is the agent's shutdown check: a clean exit, a final retained status with online=false
    over 3.1.1, and exactly one fallback to 3.1.1 in its log."""
    from tests.test_console import ConsoleProcess

    agent = AgentProcess(amqtt, tmp_path_factory.mktemp("v3dev"), "v3dev").start()  # type: ignore[arg-type]
    AgentProcess.running.discard(agent)  # outlives each test on purpose; stopped below
    console = ConsoleProcess(amqtt.url, tmp_path_factory.mktemp("console"))
    pool = ThreadPoolExecutor(1)
    starting = pool.submit(console.start)
    try:
        c = Client311(amqtt.port, ["edge/v3dev/status"])
        try:
            c.wait(lambda: any(s.get("online") for s in c.json_on("edge/v3dev/status")), "the agent online")
        finally:
            c.close()
        yield Served(agent, console, starting)
        c = Client311(amqtt.port, ["edge/v3dev/status"])
        try:
            c.wait(lambda: bool(c.json_on("edge/v3dev/status")), "the retained status")
            assert agent.stop() == 0, agent.log()[-3000:]
            c.wait(lambda: c.json_on("edge/v3dev/status")[-1].get("online") is False, "the final status")
        finally:
            c.close()
    finally:
        agent.stop()
        pool.shutdown(wait=True)  # start() ends: healthy, or its own wait gave up
        console.stop()
    log = agent.log()
    assert log.count("does not speak MQTT 5: using MQTT 3.1.1") == 1, log[-2000:]


def _status(c: Client311) -> dict[str, Any]:
    statuses = c.json_on("edge/v3dev/status")
    return statuses[-1] if statuses else {}


def test_agent_serves_through_a_broker_that_speaks_only_mqtt_3_1_1(amqtt, served):
    c = Client311(amqtt.port, ["edge/v3dev/status", "edge/v3dev/result"])
    try:

        def online(_: object = None) -> bool:
            return _status(c).get("online") is True

        c.wait(online, "the agent's status (retained, over 3.1.1)")
        status = _status(c)
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

        # A placement (retained) applies over 3.1.1 too: one above what the shared agent has applied,
        # with one more instance than it runs now.
        placement_now = status["placement"]
        generation = (placement_now.get("applied_generation") or 0) + 5
        instances = placement_now["tenants"][0]["instances"] + 1
        placement = {
            "generation": generation,
            "tenants": [{"model": "efficientnet-lite0", "instances": instances}],
        }
        c.client.publish("edge/v3dev/placement", json.dumps(placement), qos=1, retain=True).wait_for_publish(
            10
        )

        def applied(_: object = None) -> bool:
            p = _status(c).get("placement") or {}
            return p.get("applied_generation") == generation and [t["instances"] for t in p["tenants"]] == [
                instances
            ]

        c.wait(applied, f"generation {generation} applied")
    finally:
        c.close()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout
    )


def test_client_commands_work_through_a_3_1_1_only_broker(amqtt, served):
    """`edge-agent infer`, `status` and `place` fall back to MQTT 3.1.1 as the agent does: frames go
    as JSON envelopes and answers are matched by request id on the result topic."""
    common = ["--broker", amqtt.url, "--device-id", "v3dev"]
    infer = _cli("infer", *common, "--json", str(SAMPLES / "espresso.jpg"), str(SAMPLES / "daisy.jpg"))
    assert infer.returncode == 0, infer.stdout + infer.stderr
    answers = [json.loads(line) for line in infer.stdout.splitlines() if line.startswith("{")]
    assert [a["top"][0]["label"] for a in answers] == ["espresso", "daisy"], infer.stdout
    status = _cli("status", *common)
    assert status.returncode == 0 and '"mqtt_protocol": "3.1.1"' in status.stdout, status.stdout
    # One instance: a change from the two the agent test leaves (the CLI waits for it to apply).
    place = _cli("place", *common, "--model", "efficientnet-lite0", "--instances", "1")
    assert place.returncode == 0 and "applied generation" in place.stdout, place.stdout + place.stderr


def test_console_manages_an_agent_through_a_3_1_1_only_broker(served):
    """The console falls back to MQTT 3.1.1 too: it sees the device and its placement edit applies."""
    from tests.test_console import wait_until

    console = served.console()  # started with the agent; waits for MQTT connected
    admin = console.client("admin")

    def device_ready() -> dict[str, Any] | None:
        status, data = admin.call("GET", "/api/devices/v3dev")
        if status != 200 or not data["summary"].get("online"):
            return None
        return data if data["summary"]["tenants"] else None

    before = wait_until(device_ready, "the agent listed online by the console")
    instances = 2 if before["summary"]["tenants"][0]["instances"] != 2 else 1  # a real change
    body = {
        "tenants": [
            {
                "model": "efficientnet-lite0",
                "backend": "onnxruntime",
                "device": "cpu",
                "instances": instances,
            }
        ]
    }
    status, data = admin.call("PUT", "/api/devices/v3dev/placement", body)
    assert status == 200, data
    generation = data["generation"]
    assert generation == before["next_generation"]

    def applied() -> dict[str, Any] | None:
        detail = admin.get("/api/devices/v3dev")
        return detail if detail["tracking"]["state"] == "applied" else None

    detail = wait_until(applied, "the edit applied by the agent")
    assert detail["tracking"]["generation"] == generation, detail["tracking"]
    assert "using MQTT 3.1.1" in console.log()

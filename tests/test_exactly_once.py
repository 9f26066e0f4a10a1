"""Exactly once across broker restarts: a frame is served once, and every frame is answered.

The setup a fleet runs: Mosquitto with persistence, persistent sessions everywhere (camera, agent,
consumer), QoS 1. The broker is stopped and restarted mid-stream; frames the broker redelivers (its
ack from the agent was lost) and frames the camera sends again (its ack from the broker was lost)
must not be run twice. With `results_qos = 2` and QoS 2 at the camera and the consumer, the
consumer sees each answer exactly once.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.devtools.local_broker import LocalBroker
from tests.conftest import AgentProcess, Collector, sample

pytestmark = pytest.mark.timeout(900)

FRAMES = 200
RATE = 50.0


class PersistentClient:
    """A paho MQTT 5 client with a persistent session (clean_start off, an hour's session expiry)."""

    def __init__(self, port: int, client_id: str, max_inflight: int = 20) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        # A camera stays below Mosquitto's incoming QoS 2 quota (max_inflight_messages, 20): paho does
        # not adopt the broker's Receive Maximum, and a QoS 2 publish over it is refused (0x97).
        self.client.max_inflight_messages_set(max_inflight)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.cond = threading.Condition()
        self.connects = 0
        self.connected = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, *_args: object) -> None:
        with self.cond:
            self.connects += 1
            self.connected = True
            self.cond.notify_all()

    def _on_disconnect(self, *_args: object) -> None:
        with self.cond:
            self.connected = False

    def wait(self, predicate, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self.cond.wait(remaining)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Consumer(PersistentClient):
    """Subscribes to the results once (SUBACK awaited); its session keeps the subscription."""

    def __init__(self, port: int, topic: str, qos: int) -> None:
        self.answers: dict[str, list[bytes]] = defaultdict(list)
        self.subacks = 0
        super().__init__(port, f"consumer-{qos}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.wait(lambda: self.connects >= 1, "the consumer's CONNACK")
        self.client.subscribe(topic, qos=qos)
        self.wait(lambda: self.subacks >= 1, "the consumer's SUBACK")

    def _on_subscribe(self, *_args: object) -> None:
        with self.cond:
            self.subacks += 1
            self.cond.notify_all()

    def _on_message(self, _client: object, _userdata: object, message: paho.MQTTMessage) -> None:
        rid = json.loads(message.payload)["request_id"]
        with self.cond:
            self.answers[rid].append(bytes(message.payload))
            self.cond.notify_all()


class Camera(PersistentClient):
    """FRAMES frames at RATE per second, each with its own request id (correlation data)."""

    def __init__(self, port: int, topic: str, qos: int) -> None:
        super().__init__(port, f"camera-{qos}", max_inflight=10)
        self.topic, self.qos = topic, qos
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.wait(lambda: self.connects >= 1, "the camera's CONNACK")

    def _run(self) -> None:
        image = sample("cat.jpg")
        started = time.monotonic()
        while self.sent < FRAMES:
            due = min(FRAMES, int((time.monotonic() - started) * RATE) + 1)
            while self.sent < due:
                # A camera sends while connected (what it had in flight, paho sends again itself):
                # paho would send everything queued during an outage at once, past the quota.
                self.wait(lambda: self.connected, "the camera's reconnect")
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = f"f{self.sent}".encode()
                self.client.publish(self.topic, image, qos=self.qos, properties=props)
                with self.cond:
                    self.sent += 1
                    self.cond.notify_all()
            time.sleep(0.005)


def restart_round(shared: Path, round_no: int, qos: int, extra: str = "") -> dict[str, list[bytes]]:
    """One stream of FRAMES frames with a broker stop and restart in the middle; the answers."""
    workdir = shared / f"broker-{qos}-{round_no}"
    workdir.mkdir()
    state = shared / f"agent-{qos}-{round_no}"
    state.mkdir()
    device = f"eo{qos}x{round_no}"
    config = f"[broker]\nreconnect_min_s = 0.2\nreconnect_max_s = 1\nresults_qos = {qos}\n{extra}"
    with LocalBroker(workdir=workdir, persistence=True) as broker:
        agent = AgentProcess(broker, state, device, config).start()
        status = Collector(broker.port, [f"edge/{device}/status"])
        consumer = camera = None
        try:
            status.wait_for(lambda s: bool(s) and s[-1].get("online") is True, f"edge/{device}/status", 90)
            consumer = Consumer(broker.port, f"edge/{device}/result", qos)
            camera = Camera(broker.port, f"edge/{device}/infer", qos)
            camera.thread.start()
            camera.wait(lambda: camera.sent >= FRAMES // 2, "half the frames sent")
            broker.stop()  # SIGTERM: Mosquitto saves sessions and queued messages
            broker.start()  # same port, same persistence file
            consumer.wait(lambda: len(consumer.answers) >= FRAMES, "every frame answered", timeout=180)
            camera.thread.join(30)
        finally:
            for client in (camera, consumer):
                if client is not None:
                    client.close()
            status.close()
            agent.stop()
        assert agent.log().count("mqtt connection lost or refused") >= 1, "the agent saw the restart"
        return dict(consumer.answers)


def check(answers: dict[str, list[bytes]], qos: int) -> None:
    assert set(answers) == {f"f{i}" for i in range(FRAMES)}, "every frame answered"
    served_twice = {rid: len(set(p)) for rid, p in answers.items() if len(set(p)) > 1}
    assert not served_twice, f"served more than once (different answers): {served_twice}"
    if qos == 2:
        delivered_twice = {rid: len(p) for rid, p in answers.items() if len(p) > 1}
        assert not delivered_twice, f"QoS 2: delivered more than once: {delivered_twice}"


@pytest.mark.parametrize("qos", [1, 2])
def test_broker_restart_mid_stream_serves_every_frame_once(shared_dir, qos):
    check(restart_round(shared_dir, 0, qos), qos)


@pytest.mark.slow
@pytest.mark.parametrize("qos", [1, 2])
def test_broker_restart_twenty_times_in_a_row(shared_dir, qos):
    for round_no in range(1, 21):
        check(restart_round(shared_dir, round_no, qos), qos)


def test_a_frame_sent_again_is_answered_again_not_run_again(agent_factory, collector):
    """A caller that repeats a request id (while it runs, and after) gets the same answer, byte for
    byte; the frame runs once (one metrics row); telemetry counts the repeats. Another model, or a
    frame without the caller's id, is a new request."""
    config = (
        "[metrics]\ntelemetry_interval_s = 0.5\nflush_interval_s = 0.1\n"
        '[placement]\ngeneration = 0\n[[placement.tenants]]\nmodel = "efficientnet-lite0"\n'
        '[[placement.tenants]]\nmodel = "efficientnet-lite1"\n'
    )
    agent = agent_factory("dup1", config).start()
    agent.wait_ready()
    c = collector(["edge/dup1/result", "edge/dup1/telemetry"])
    image = sample("espresso.jpg")

    def send(request_id: str | None, topic: str = "edge/dup1/infer") -> None:
        props = Properties(PacketTypes.PUBLISH)
        if request_id is not None:
            props.CorrelationData = request_id.encode()
        c.client.publish(topic, image, qos=1, properties=props).wait_for_publish(10)

    send("same")
    send("same")  # most likely still in flight: attached to the first
    first = c.wait_for(lambda r: sum(x["request_id"] == "same" for x in r) >= 2, "edge/dup1/result")
    send("same")  # answered by now: the stored answer again
    send("same", "edge/dup1/infer/efficientnet-lite1")  # the same id for another model: a new request
    send(None)
    send(None)
    results = c.wait_for(
        lambda r: sum(x["request_id"] == "same" for x in r) >= 4 and len(r) >= 6, "edge/dup1/result"
    )
    raw = [m.payload for m in c.messages if m.topic == "edge/dup1/result"]
    lite0 = {
        p
        for p, x in zip(raw, results, strict=True)
        if x["request_id"] == "same" and x["model"] == "efficientnet-lite0"
    }
    assert len(lite0) == 1, "every answer to the repeated id is the same bytes"
    assert json.loads(next(iter(lite0)))["top"][0]["label"] == "espresso"
    assert sum(x["request_id"] == "same" and x["model"] == "efficientnet-lite1" for x in results) == 1
    assert len({x["request_id"] for x in results} - {"same"}) == 2, "frames without an id each run"
    assert len(first) >= 2
    telemetry = c.wait_for(lambda t: bool(t) and t[-1].get("duplicates") == 2, "edge/dup1/telemetry")
    assert telemetry[-1]["duplicates"] == 2
    assert telemetry[-1]["broker_dropped"] == 0, "Mosquitto's $SYS count of dropped publishes"
    rows = agent_rows(agent.state_dir, "same")
    assert rows == ["efficientnet-lite0", "efficientnet-lite1"], "the repeated frame ran once per model"


def agent_rows(state_dir: Path, request_id: str) -> list[str]:
    """The models that served `request_id`, from the agent's per-frame metrics (once flushed)."""
    deadline = time.monotonic() + 30
    while True:
        with sqlite3.connect(state_dir / "metrics.db") as db:
            rows = sorted(
                r[0] for r in db.execute("SELECT model FROM inferences WHERE request_id = ?", (request_id,))
            )
        if len(rows) >= 2 or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def count_rows(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return int(conn.execute(sql).fetchone()[0])
        except sqlite3.OperationalError:  # the table is not created yet
            return 0


def wait_rows(db: Path, sql: str, at_least: int, what: str, timeout: float = 120.0) -> int:
    """Poll an SQLite file the agent writes (it has no other way to tell) until `at_least` rows."""
    deadline = time.monotonic() + timeout
    while (n := count_rows(db, sql)) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {n} < {at_least}")
        time.sleep(0.1)
    return n


def test_agent_killed_while_the_broker_is_down_sends_its_spool_once(shared_dir):
    """Frames in, broker stopped while the agent answers them (answers spooled), agent SIGKILLed,
    restarted while the broker is still down, broker back: every answer arrives, once."""
    frames = 120
    workdir, state = shared_dir / "broker", shared_dir / "agent"
    workdir.mkdir()
    state.mkdir()
    config = (
        "[broker]\nreconnect_min_s = 0.2\nreconnect_max_s = 1\n"
        "[scheduler]\nqueue_depth = 1000\n[metrics]\nflush_interval_s = 0.1\ntelemetry_interval_s = 0.2\n"
        '[placement]\ngeneration = 0\n[[placement.tenants]]\nmodel = "efficientnet-lite1"\n'
    )
    with LocalBroker(workdir=workdir, persistence=True) as broker:
        agent = AgentProcess(broker, state, "spool1", config).start()
        agent.wait_ready()
        consumer = Consumer(broker.port, "edge/spool1/result", 1)
        camera = Camera(broker.port, "edge/spool1/infer/efficientnet-lite1", 1)
        telemetry = Collector(broker.port, ["edge/spool1/telemetry"])
        try:
            image = sample("palace.jpg")
            infos = []
            for i in range(frames):
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = f"s{i}".encode()
                infos.append(camera.client.publish(camera.topic, image, qos=1, properties=props))
            for info in infos:
                info.wait_for_publish(30)  # the broker has every frame
            metrics, outbox = state / "metrics.db", state / "outbox.db"
            # The broker hands frames over a few at a time (its in-flight limit): stop it only once the
            # agent holds every frame, else the rest wait in the broker until it is back.
            telemetry.wait_for(
                lambda m: any(sum(t["frames_in"] for t in x["tenants"]) >= frames for x in m),
                "edge/spool1/telemetry",
                timeout=120,
            )
            broker.stop()  # the agent goes on answering what it has queued: into its spool
            outage = time.time()  # answered after this, the broker cannot have had it
            wait_rows(metrics, "SELECT COUNT(*) FROM inferences", frames, "every frame served")
            spooled = wait_rows(
                outbox, "SELECT COUNT(*) FROM outbox WHERE topic = 'edge/spool1/result'", 1, "answers spooled"
            )
            agent.stop(signal.SIGKILL)
            assert (
                count_rows(outbox, "SELECT COUNT(*) FROM outbox WHERE topic = 'edge/spool1/result'")
                >= spooled
            )
            agent = AgentProcess(broker, state, "spool1", config).start()  # the broker is still down
            deadline = time.monotonic() + 60
            while "unsent messages from the last run will be sent" not in agent.log():
                assert time.monotonic() < deadline, agent.log()[-2000:]
                time.sleep(0.1)
            broker.start()
            consumer.wait(lambda: len(consumer.answers) >= frames, "every answer", timeout=120)
        finally:
            telemetry.close()
            camera.close()
            consumer.close()
            agent.stop()
    answers = consumer.answers
    assert set(answers) == {f"s{i}" for i in range(frames)}, "every answer arrived"
    served_twice = {rid for rid, p in answers.items() if len(set(p)) > 1}
    assert not served_twice, f"served more than once: {served_twice}"
    # Answered while the broker was down: only in the spool, so they must arrive exactly once. An
    # answer in flight when the broker went away may arrive twice (QoS 1: the broker may have had it).
    with sqlite3.connect(state / "metrics.db") as db:
        spooled = {r[0] for r in db.execute("SELECT request_id FROM inferences WHERE ts > ?", (outage,))}
    assert spooled, "some answers were produced during the outage"
    twice = {rid: len(answers[rid]) for rid in spooled if len(answers[rid]) > 1}
    assert not twice, f"spooled answers delivered more than once: {twice}"
    labels = {json.loads(p[0])["top"][0]["label"] for p in answers.values()}
    assert labels == {"palace"}

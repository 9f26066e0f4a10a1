"""The real agent process against a real Mosquitto: frames in, results out, errors answered."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import subprocess
import time
import uuid

import pytest

from tests import badimages
from tests.conftest import CAT_CLASSES, ESPRESSO, SAMPLES, sample

pytestmark = pytest.mark.timeout(180)


def test_mosquitto_pub_photo_gets_right_label(agent_factory, collector, broker):
    """The README's promise: publish a photo with mosquitto_pub, read the answer with mosquitto_sub."""
    agent = agent_factory("cam1").start()
    agent.wait_ready()
    sub = subprocess.Popen(
        [
            "stdbuf",  # line-buffered stdout through the pipe: each line arrives when it is printed
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-t",
            "edge/cam1/result",
            "-C",
            "2",
            "-W",
            "60",
            "-d",  # debug lines on stdout too: the SUBACK says when publishing may start
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sub.stdout is not None
    for line in sub.stdout:  # ends when mosquitto_sub does (-W 60): then the assert below fails
        if "received SUBACK" in line:
            break
    else:
        raise AssertionError("mosquitto_sub ended before it was subscribed")
    for name in ("cat.jpg", "espresso.jpg"):
        subprocess.run(
            [
                "mosquitto_pub",
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-t",
                "edge/cam1/infer",
                "-f",
                str(SAMPLES / name),
            ],
            check=True,
        )
    out, _ = sub.communicate(timeout=60)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == 2
    assert results[0]["top"][0]["index"] in CAT_CLASSES
    assert results[1]["top"][0]["index"] == ESPRESSO
    assert results[1]["top"][0]["label"] == "espresso"
    assert len(results[0]["top"]) == 5
    assert results[0]["tenant"] == {"backend": "onnxruntime", "device": "cpu", "instance": 0}
    assert set(results[0]["timing_ms"]) == {"queue", "preprocess", "infer", "total"}


def test_mosquitto_rr_envelope_gets_answer_on_response_topic(agent_factory, broker):
    """An MQTT 3.1.1-style JSON envelope through mosquitto_rr (MQTT 5 request/response)."""
    agent = agent_factory("rr1").start()
    agent.wait_ready()
    envelope = json.dumps({"request_id": "rr-42", "image_b64": base64.b64encode(sample("cat.jpg")).decode()})
    done = subprocess.run(
        [
            "mosquitto_rr",
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-t",
            "edge/rr1/infer",
            "-e",
            f"replies/{uuid.uuid4().hex}",
            "-m",
            envelope,
            "-W",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    answer = json.loads(done.stdout)
    assert answer["request_id"] == "rr-42"
    assert answer["top"][0]["index"] in CAT_CLASSES


def test_mqtt5_correlation_user_properties_and_topic_model(agent_factory, collector):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    agent = agent_factory("p5").start()
    agent.wait_ready()
    c = collector(["edge/p5/result", "my/replies"])
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"corr-1"
    props.ResponseTopic = "my/replies"
    c.publish("edge/p5/infer", sample("espresso.jpg"), properties=props)
    props2 = Properties(PacketTypes.PUBLISH)
    props2.UserProperty = [("request_id", "user-prop-id"), ("model", "efficientnet-lite0")]
    c.publish("edge/p5/infer", sample("cat.jpg"), properties=props2)
    # Topic suffix picks the model; this one is not placed, so it is refused by name.
    c.publish("edge/p5/infer/efficientnet-lite1", sample("cat.jpg"))
    results = c.wait_for(lambda r: len(r) >= 3, "edge/p5/result")
    by_id = {r["request_id"]: r for r in results}
    assert by_id["corr-1"]["top"][0]["index"] == ESPRESSO
    assert by_id["user-prop-id"]["top"][0]["index"] in CAT_CLASSES
    refused = [r for r in results if "error" in r]
    assert refused[0]["error"]["code"] == "unknown_model"
    assert "efficientnet-lite1" in refused[0]["error"]["message"]
    replies = c.wait_for(lambda r: len(r) >= 1, "my/replies")
    assert replies[0]["request_id"] == "corr-1"
    reply_msg = next(m for m in c.messages if m.topic == "my/replies")
    assert reply_msg.properties.CorrelationData == b"corr-1"


BAD_INPUTS = {
    "garbage": (b"\x13\x37 this is not an image" * 10, "bad_image"),
    "empty": (b"", "bad_image"),
    "truncated_jpeg": (badimages.truncated_jpeg(), "bad_image"),
    "jpeg_bomb": (badimages.jpeg_bomb(), "bad_image"),
    "png_bomb": (badimages.png_bomb(), "bad_image"),
    "gif": (badimages.gif(), "bad_image"),
    "too_large": (b"\xff\xd8\xff" + b"\x00" * (9 * 1024 * 1024), "too_large"),
    "bad_json": (b'{"image_b64": ', "bad_request"),
    "bad_base64": (b'{"request_id": "b64", "image_b64": "@@not base64@@"}', "bad_request"),
    "unknown_model": (
        json.dumps(
            {"model": "no-such-model", "image_b64": base64.b64encode(sample("cat.jpg")).decode()}
        ).encode(),
        "unknown_model",
    ),
    "traversal_model": (
        json.dumps(
            {"model": "../../etc/passwd", "image_b64": base64.b64encode(sample("cat.jpg")).decode()}
        ).encode(),
        "unknown_model",
    ),
}


def test_bad_inputs_each_get_an_error_and_the_agent_keeps_serving(agent_factory, collector):
    agent = agent_factory("bad1").start()
    agent.wait_ready()
    c = collector(["edge/bad1/result"])
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    for name, (payload, _code) in BAD_INPUTS.items():
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = name.encode()
        c.publish("edge/bad1/infer", payload, properties=props)
        good = Properties(PacketTypes.PUBLISH)
        good.CorrelationData = f"good-after-{name}".encode()
        c.publish("edge/bad1/infer", sample("espresso.jpg"), properties=good)
    expected = 2 * len(BAD_INPUTS)
    results = c.wait_for(lambda r: len(r) >= expected, "edge/bad1/result", timeout=60)
    by_id = {r["request_id"]: r for r in results}
    assert len(results) == expected, "every frame gets exactly one answer"
    for name, (_payload, code) in BAD_INPUTS.items():
        assert by_id[name]["error"]["code"] == code, (name, by_id[name])
        assert by_id[name]["error"]["message"]
        assert by_id[f"good-after-{name}"]["top"][0]["index"] == ESPRESSO
    assert agent.proc.poll() is None, "agent still running"
    assert not any(p.name.startswith("passwd") for p in agent.state_dir.iterdir())


def test_metrics_rows_and_telemetry(agent_factory, collector):
    agent = agent_factory(
        "m1", config="[metrics]\ntelemetry_interval_s = 0.5\nflush_interval_s = 0.2\n"
    ).start()
    agent.wait_ready()
    c = collector(["edge/m1/result", "edge/m1/telemetry"])
    for _ in range(5):
        c.publish("edge/m1/infer", sample("cat.jpg"))
    c.publish("edge/m1/infer", b"junk")
    c.wait_for(lambda r: len(r) >= 6, "edge/m1/result")
    telemetry = c.wait_for(
        lambda r: any(t["tenants"] and t["tenants"][0]["frames_out"] >= 5 for t in r), "edge/m1/telemetry"
    )
    tenant = telemetry[-1]["tenants"][0]
    assert tenant["model"] == "efficientnet-lite0"
    assert tenant["latency_ms"]["p50"] > 0
    assert telemetry[-1]["device"]["rss_mb"] > 0
    deadline = time.monotonic() + 10
    rows: list[tuple] = []
    while time.monotonic() < deadline:
        with sqlite3.connect(agent.state_dir / "metrics.db") as db:
            rows = db.execute("SELECT status, model, backend, total_ms FROM inferences").fetchall()
        if len(rows) >= 5:
            break
        time.sleep(0.2)
    ok = [r for r in rows if r[0] == "ok"]
    assert len(ok) == 5
    assert all(r[1] == "efficientnet-lite0" and r[2] == "onnxruntime" and r[3] > 0 for r in ok)
    with sqlite3.connect(agent.state_dir / "metrics.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_status_retained_and_last_will_on_crash(agent_factory, collector):
    import signal

    agent = agent_factory("will1").start()
    status = agent.wait_ready()
    assert status["online"] is True
    assert status["capabilities"]["backends"]["onnxruntime"]["available"] is True
    assert "efficientnet-lite0" in status["capabilities"]["models"]
    agent.stop(signal.SIGKILL)
    c = collector(["edge/will1/status"])
    c.wait_for(lambda r: bool(r) and r[-1]["online"] is False, "edge/will1/status", timeout=90)


def test_clean_stop_publishes_offline_and_exits_zero(agent_factory, collector):
    agent = agent_factory("stop1").start()
    agent.wait_ready()
    assert agent.stop() == 0
    c = collector(["edge/stop1/status"])
    got = c.wait_for(lambda r: bool(r), "edge/stop1/status", timeout=10)
    assert got[-1]["online"] is False


def test_agent_reconnects_after_broker_restart(agent_factory, collector, broker):
    agent = agent_factory("rc1").start()
    agent.wait_ready()
    broker.stop(kill=True)
    time.sleep(2.0)  # the outage itself (on purpose): the agent retries meanwhile
    broker.start()  # same port, empty state: the agent must resubscribe by itself
    agent.wait_ready(timeout=60)
    c = collector(["edge/rc1/result"])
    c.publish("edge/rc1/infer", sample("cat.jpg"))
    got = c.wait_for(lambda r: len(r) >= 1, "edge/rc1/result", timeout=60)
    assert got[0]["top"][0]["index"] in CAT_CLASSES
    assert "retrying" in agent.log()


def test_session_handler_that_raises_is_counted_and_dispatch_goes_on(broker):
    """The frame path calls handlers from paho's topic callbacks: one that raises must not stop it,
    and each subscription gets only its own topics."""
    import aiomqtt

    from agent.service.config import BrokerConfig
    from agent.service.mqtt_session import Incoming, MqttSession

    async def scenario() -> tuple[list[Incoming], list[Incoming], int]:
        session = MqttSession(
            BrokerConfig(host="127.0.0.1", port=broker.port), "session-test", "t/status", b"{}"
        )
        frames: list[Incoming] = []
        others: list[Incoming] = []
        all_in = asyncio.Event()

        def on_frame(message: Incoming) -> None:
            frames.append(message)
            if len(frames) == 3 and others:
                all_in.set()
            if message.payload == b"boom":
                raise RuntimeError("handler bug")

        def on_other(message: Incoming) -> None:
            others.append(message)
            if len(frames) == 3:
                all_in.set()

        session.subscribe("t/infer/#", on_frame)
        session.subscribe("t/other", on_other)
        runner = asyncio.create_task(session.run())
        await asyncio.wait_for(session.connected.wait(), 10)
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            for payload in (b"boom", b"one", b"two"):
                await client.publish("t/infer/m", payload, qos=1)
            await client.publish("t/other", b"x", qos=1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 10)
        await session.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        return frames, others, session.handler_errors

    frames, others, errors = asyncio.run(scenario())
    assert [m.payload for m in frames] == [b"boom", b"one", b"two"]
    assert all(m.topic == "t/infer/m" for m in frames)
    assert [(m.topic, m.payload) for m in others] == [("t/other", b"x")]
    assert errors == 1


def test_session_finishes_writing_when_the_socket_was_full(broker):
    """While the broker is frozen, 12 MB of results overflow the socket buffer (the write path's
    EAGAIN branch); once it resumes, every message is written, acknowledged and delivered."""
    import os
    import signal

    import aiomqtt

    from agent.service.config import BrokerConfig
    from agent.service.mqtt_session import MqttSession

    count, size = 24, 512 * 1024

    async def scenario() -> tuple[int, int]:
        session = MqttSession(
            BrokerConfig(host="127.0.0.1", port=broker.port, keepalive_s=60), "full-socket", "t/status", b"{}"
        )
        runner = asyncio.create_task(session.run())
        await asyncio.wait_for(session.connected.wait(), 10)
        acked = 0
        all_acked = asyncio.Event()

        def done() -> None:
            nonlocal acked
            acked += 1
            if acked == count:
                all_acked.set()

        async with aiomqtt.Client("127.0.0.1", broker.port, max_queued_incoming_messages=0) as sub:
            await sub.subscribe("big/#", qos=1)
            os.kill(broker.proc.pid, signal.SIGSTOP)
            try:
                for i in range(count):
                    session.publish_nowait(f"big/{i}", bytes([i]) * size, 1, False, None, done)
                # On purpose, while the broker is frozen: the loop keeps writing what the kernel
                # takes, then waits for the socket to drain (nothing to wait for but time here).
                await asyncio.sleep(1.0)
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)
            received = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    async for message in sub.messages:
                        assert message.payload == bytes([int(str(message.topic).split("/")[1])]) * size
                        received += 1
                        if received == count:
                            break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_acked.wait(), 30)
        await session.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        return received, acked

    received, acked = asyncio.run(scenario())
    assert (received, acked) == (count, count)


def test_outbox_drops_a_message_paho_refuses_and_sends_the_rest(broker, tmp_path):
    """A message that can never be published (a wildcard in its topic) is dropped and counted,
    not retried forever; the messages queued behind it still go out, in order."""
    import aiomqtt

    from agent.service.config import BrokerConfig
    from agent.service.mqtt_session import MqttSession
    from agent.service.outbox import Outbox, OutboxStore

    async def scenario() -> tuple[list[bytes], int, int]:
        session = MqttSession(BrokerConfig(host="127.0.0.1", port=broker.port), "poison", "t/status", b"{}")
        store = OutboxStore(tmp_path / "outbox.db")
        outbox = Outbox(session, asyncio.get_running_loop(), store, store.load())
        tasks = [asyncio.create_task(session.run()), asyncio.create_task(outbox.run())]
        await asyncio.wait_for(session.connected.wait(), 10)
        got: list[bytes] = []
        async with aiomqtt.Client("127.0.0.1", broker.port) as sub:
            await sub.subscribe("out/#", qos=1)
            outbox.put_many(
                [("out/1", b"one", 1, None), ("out/+/bad", b"poison", 1, None), ("out/2", b"two", 1, None)]
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    async for message in sub.messages:
                        got.append(bytes(message.payload))
                        if len(got) == 2:
                            break
        flushed = await outbox.flush(5.0)
        await session.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        outbox.close()
        return got, outbox.dropped, int(flushed)

    got, dropped, flushed = asyncio.run(scenario())
    assert got == [b"one", b"two"]
    assert dropped == 1 and flushed == 1
    left = OutboxStore(tmp_path / "outbox.db").load()
    assert left == [], "the dropped message must not come back at the next start"


def test_outbox_holds_at_most_its_byte_budget_dropping_the_oldest():
    """Senders choose correlation data (up to 64 KiB) per frame: the spool is bounded in bytes, not
    only in messages, so a long outage cannot exhaust memory. The newest answers are kept."""
    from agent.service.config import BrokerConfig
    from agent.service.mqtt_session import MqttSession
    from agent.service.outbox import Outbox

    async def scenario() -> tuple[list[bytes], int, int]:
        session = MqttSession(BrokerConfig(host="127.0.0.1", port=1), "budget", "t/status", b"{}")
        outbox = Outbox(session, asyncio.get_running_loop(), None, max_bytes=10_000)
        for i in range(20):  # the broker is away: everything waits in the outbox
            outbox.put(f"out/{i}", b"x" * 100, 1, correlation_data=bytes([i]) * 1900)
        # The hand-over from "worker threads" happens on the loop: wait until each message was taken
        # in, kept or dropped (a bounded number of loop turns, no clock).
        for _ in range(1000):
            if len(outbox) + outbox.dropped == 20:
                break
            await asyncio.sleep(0)
        kept = [(m.correlation_data or b"")[:1] for m in sorted(outbox._pending)]
        return kept, outbox.dropped, outbox._bytes

    kept, dropped, held = asyncio.run(scenario())
    assert held <= 10_000 and dropped == 20 - len(kept) and len(kept) == 4
    assert kept == [bytes([i]) for i in range(16, 20)], "the oldest are dropped first"

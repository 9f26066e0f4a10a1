"""`python -m bench.burst`: how many frames of a burst a broker drops before the agent sees them.

A camera publishes N frames at QoS 1 as fast as the broker takes them; the agent answers every frame
it receives (results, or `overloaded` when its queue is full) and writes a metrics row for each, so
frames without a row were dropped by the broker before the agent saw them. Run against a private
Mosquitto with its default queue limit (`max_queued_messages 1000`) and the fleet setting of
deploy/mosquitto (10000), for a few values of the agent's MQTT 5 Receive Maximum, each `--repeat`
times (bursts race the agent: the figures vary run to run). Prints a table; the broker's own `$SYS`
drop counter beside it. Request ids are new in every run, and each run fails if the agent's
telemetry counts a frame of it as a duplicate (answered from memory, bench/agent_counters.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.devtools.demo import start_agent, wait_ready
from agent.devtools.local_broker import LocalBroker
from bench.agent_counters import AgentCounters, check, exit_status
from bench.loadgen import run_prefix

SAMPLE = Path(__file__).resolve().parent.parent / "agent" / "samples" / "cat.jpg"
DEVICE = "burst"


class BrokerDrops:
    """The broker's `$SYS` count of publishes it dropped (queue and in-flight limits)."""

    def __init__(self, port: int) -> None:
        self.dropped = 0
        self.updates = 0
        self.cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("$SYS/broker/publish/messages/dropped", qos=0)

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        with self.cond:
            self.dropped = int(message.payload)
            self.updates += 1
            self.cond.notify_all()

    def latest(self, timeout_s: float = 5.0) -> int:
        """The next figure the broker publishes (it does so every `sys_interval`, 1 s here)."""
        with self.cond:
            seen = self.updates
            self.cond.wait_for(lambda: self.updates > seen, timeout=timeout_s)
            return self.dropped

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def received(state_dir: Path, expected: int, quiet_s: float = 5.0) -> int:
    """Frames the agent received: one metrics row each (results and errors alike), once the count
    reached `expected` or stopped growing for `quiet_s`."""
    count, last = -1, time.monotonic()
    while True:
        with sqlite3.connect(state_dir / "metrics.db") as db:
            now = db.execute("SELECT COUNT(DISTINCT request_id) FROM inferences").fetchone()[0]
        if now != count:
            count, last = now, time.monotonic()
        if count >= expected or time.monotonic() - last > quiet_s:
            return count
        time.sleep(0.25)


def burst(port: int, frames: int) -> None:
    """Publish `frames` frames at QoS 1 back to back and wait until the broker acknowledged each."""
    camera = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    camera.max_inflight_messages_set(1000)
    camera.connect("127.0.0.1", port)
    camera.loop_start()
    image = SAMPLE.read_bytes()
    infos = []
    prefix = run_prefix("burst")
    for i in range(frames):
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = f"{prefix}-b{i}".encode()
        infos.append(camera.publish(f"edge/{DEVICE}/infer", image, qos=1, properties=props))
    for info in infos:
        info.wait_for_publish(60)
    camera.disconnect()
    camera.loop_stop()


def one(frames: int, queue_limit: int, receive_maximum: int) -> tuple[int, int]:
    extra = f"max_queued_messages {queue_limit}\nsys_interval 1\n"
    with LocalBroker(extra_config=extra) as broker, tempfile.TemporaryDirectory() as tmp:
        config = (
            f'log_level = "WARNING"\n[broker]\nreceive_maximum = {receive_maximum}\n'
            "[metrics]\nflush_interval_s = 0.2\ntelemetry_interval_s = 1.0\n"
        )
        agent = start_agent(broker.url, Path(tmp), DEVICE, config)
        drops = BrokerDrops(broker.port)
        counters = AgentCounters(broker.url, DEVICE)
        try:
            asyncio.run(wait_ready(broker.url, DEVICE))
            before = counters.read()
            burst(broker.port, frames)
            got = received(Path(tmp), frames)
            check(before, counters.read(), {}, f"burst of {frames}")  # no frame answered from memory
            return got, drops.latest()
        finally:
            counters.close()
            drops.close()
            agent.terminate()
            agent.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--queue-limits", default="1000,10000")
    parser.add_argument("--receive-maximums", default="20,1000,65535")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    size = SAMPLE.stat().st_size
    print(f"burst of {args.frames} frames at QoS 1, back to back ({SAMPLE.name}, {size} bytes)")
    header = ("max_queued_messages", "receive_maximum", "received", "lost", "$SYS dropped")
    print(f"{header[0]:>20} {header[1]:>16} {header[2]:>9} {header[3]:>6} {header[4]:>13}")
    for limit in (int(x) for x in args.queue_limits.split(",")):
        for receive_maximum in (int(x) for x in args.receive_maximums.split(",")):
            for _ in range(args.repeat):
                got, dropped = one(args.frames, limit, receive_maximum)
                lost = args.frames - got
                print(f"{limit:>20} {receive_maximum:>16} {got:>9} {lost:>6} {dropped:>13}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))

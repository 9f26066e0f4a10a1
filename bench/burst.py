"""`python -m bench.burst`: how many frames of a burst a broker drops before the agent sees them.

A camera publishes N frames at QoS 1 as fast as the broker takes them; the agent answers every frame
it receives (results, or `overloaded` when its queue is full), so frames without an answer were
dropped by the broker. Run against a private Mosquitto with its default queue limit
(`max_queued_messages 1000`) and the fleet setting of deploy/mosquitto (10000), for a few values of
the agent's MQTT 5 Receive Maximum. Prints a table; the broker's own `$SYS` drop counter beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

SAMPLE = Path(__file__).resolve().parent.parent / "agent" / "samples" / "cat.jpg"
DEVICE = "burst"


class Counter:
    """Answers on the result topic and the broker's `$SYS` count of dropped publishes."""

    def __init__(self, port: int) -> None:
        self.answers: set[str] = set()
        self.dropped = 0
        self.cond = threading.Condition()
        self.subacks = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"edge/{DEVICE}/result", qos=1)
        self.client.subscribe("$SYS/broker/publish/messages/dropped", qos=0)
        with self.cond:
            self.cond.wait_for(lambda: self.subacks >= 2, timeout=10)

    def _on_subscribe(self, *_: object) -> None:
        with self.cond:
            self.subacks += 1
            self.cond.notify_all()

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        with self.cond:
            if message.topic.startswith("$SYS"):
                self.dropped = int(message.payload)
            else:
                self.answers.add(json.loads(message.payload)["request_id"])
            self.cond.notify_all()

    def settle(self, expected: int, quiet_s: float) -> int:
        """Answers once all came, or none came for `quiet_s`."""
        with self.cond:
            while len(self.answers) < expected:
                before = len(self.answers)
                self.cond.wait(quiet_s)
                if len(self.answers) == before:
                    break
            return len(self.answers)


def burst(port: int, frames: int) -> None:
    """Publish `frames` frames at QoS 1 back to back and wait until the broker acknowledged each."""
    camera = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    camera.max_inflight_messages_set(1000)
    camera.connect("127.0.0.1", port)
    camera.loop_start()
    image = SAMPLE.read_bytes()
    infos = []
    for i in range(frames):
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = f"b{i}".encode()
        infos.append(camera.publish(f"edge/{DEVICE}/infer", image, qos=1, properties=props))
    for info in infos:
        info.wait_for_publish(60)
    camera.disconnect()
    camera.loop_stop()


def one(frames: int, queue_limit: int, receive_maximum: int) -> tuple[int, int]:
    extra = f"max_queued_messages {queue_limit}\nsys_interval 1\n"
    with LocalBroker(extra_config=extra) as broker, tempfile.TemporaryDirectory() as tmp:
        config = f'log_level = "WARNING"\n[broker]\nreceive_maximum = {receive_maximum}\n'
        agent = start_agent(broker.url, Path(tmp), DEVICE, config)
        try:
            asyncio.run(wait_ready(broker.url, DEVICE))
            counter = Counter(broker.port)
            burst(broker.port, frames)
            answered = counter.settle(frames, quiet_s=5.0)
            time.sleep(1.5)  # the broker publishes $SYS once a second
            return answered, counter.dropped
        finally:
            agent.terminate()
            agent.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--queue-limits", default="1000,10000")
    parser.add_argument("--receive-maximums", default="20,1000,65535")
    args = parser.parse_args(argv)
    size = SAMPLE.stat().st_size
    print(f"burst of {args.frames} frames at QoS 1, back to back ({SAMPLE.name}, {size} bytes)")
    header = ("max_queued_messages", "receive_maximum", "answered", "lost", "$SYS dropped")
    print(f"{header[0]:>20} {header[1]:>16} {header[2]:>9} {header[3]:>6} {header[4]:>13}")
    for limit in (int(x) for x in args.queue_limits.split(",")):
        for receive_maximum in (int(x) for x in args.receive_maximums.split(",")):
            answered, dropped = one(args.frames, limit, receive_maximum)
            lost = args.frames - answered
            print(f"{limit:>20} {receive_maximum:>16} {answered:>9} {lost:>6} {dropped:>13}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

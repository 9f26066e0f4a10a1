"""`python -m bench.qos_cost`: what `results_qos = 2` costs against QoS 1, measured side by side.

For each QoS: a private Mosquitto, the agent with `broker.results_qos` set to it, and a camera that
publishes at that QoS and reads the answers at that QoS. Two figures per QoS: the round trip of one
frame at a time (p50, p99 over `--frames`), and the time to answer a burst of `--burst` frames sent
back to back (answers per second). Printed with the QoS 2 / QoS 1 ratio. Request ids are new in
every run, and each run fails unless the agent's telemetry counted an inference for every result
(bench/agent_counters.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
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
from bench.agent_counters import TELEMETRY_CONFIG, AgentCounters, check, exit_status
from bench.loadgen import run_prefix

SAMPLE = Path(__file__).resolve().parent.parent / "agent" / "samples" / "cat.jpg"
DEVICE = "qos"


class Camera:
    def __init__(self, port: int, qos: int) -> None:
        self.qos = qos
        self.answered: dict[str, float] = {}
        self.results: dict[str, int] = {}  # model -> results received (repeats included)
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(16)  # below Mosquitto's incoming QoS 2 quota (20)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"edge/{DEVICE}/result", qos=qos)
        self.subscribed.wait(10)
        self.image = SAMPLE.read_bytes()

    @staticmethod
    def _on_connect(client: paho.Client, *_: object) -> None:
        sock = client.socket()
        if isinstance(sock, socket.socket):  # Nagle + delayed ACK would add ~40 ms per round trip
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        body = json.loads(message.payload)
        rid = body["request_id"]
        with self.cond:
            if "error" not in body:
                self.results[body["model"]] = self.results.get(body["model"], 0) + 1
            self.answered.setdefault(rid, time.perf_counter())
            self.cond.notify_all()

    def send(self, rid: str) -> float:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = rid.encode()
        sent = time.perf_counter()
        self.client.publish(f"edge/{DEVICE}/infer", self.image, qos=self.qos, properties=props)
        return sent

    def wait(self, rids: list[str], timeout: float = 120.0) -> None:
        with self.cond:
            self.cond.wait_for(lambda: all(r in self.answered for r in rids), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure(qos: int, frames: int, burst: int) -> tuple[float, float, float]:
    with (
        LocalBroker(extra_config="max_queued_messages 100000\n") as broker,
        tempfile.TemporaryDirectory() as tmp,
    ):
        config = (
            f'log_level = "WARNING"\n[broker]\nresults_qos = {qos}\n[scheduler]\nqueue_depth = 4096\n'
            + TELEMETRY_CONFIG
        )
        agent = start_agent(broker.url, Path(tmp), DEVICE, config)
        counters = AgentCounters(broker.url, DEVICE)
        try:
            asyncio.run(wait_ready(broker.url, DEVICE))
            before = counters.read()
            camera = Camera(broker.port, qos)
            prefix = run_prefix("qos")
            for i in range(20):  # warm-up
                camera.send(f"{prefix}-w{i}")
                camera.wait([f"{prefix}-w{i}"])
            rtts = []
            for i in range(frames):
                rid = f"{prefix}-r{i}"
                sent = camera.send(rid)
                camera.wait([rid])
                rtts.append((camera.answered[rid] - sent) * 1000)
            ids = [f"{prefix}-b{i}" for i in range(burst)]
            start = time.perf_counter()
            for rid in ids:
                camera.send(rid)
            camera.wait(ids)
            rate = burst / (max(camera.answered[r] for r in ids) - start)
            camera.close()
            check(before, counters.read(), camera.results, f"QoS {qos}")
            return statistics.median(rtts), statistics.quantiles(rtts, n=100)[98], rate
        finally:
            counters.close()
            agent.terminate()
            agent.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.qos_cost", description=__doc__)
    parser.add_argument("--frames", type=int, default=300, help="one-at-a-time round trips per QoS")
    parser.add_argument("--burst", type=int, default=1000, help="frames sent back to back per QoS")
    args = parser.parse_args(argv)
    results = {qos: measure(qos, args.frames, args.burst) for qos in (1, 2)}
    print(f"{'':24} {'QoS 1':>10} {'QoS 2':>10} {'QoS 2 / QoS 1':>14}")
    for index, (label, unit) in enumerate(
        [("round trip p50", "ms"), ("round trip p99", "ms"), ("burst answers/s", "/s")]
    ):
        one, two = results[1][index], results[2][index]
        print(f"{label + ' (' + unit + ')':24} {one:>10.1f} {two:>10.1f} {two / one:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))

"""`python -m bench.failover`: how long a tenant takes to serve again after its accelerator fails,
and how many frames are answered with an error meanwhile, for a hang and for runtime errors.

For each fault: a private Mosquitto, the agent with one tenant on OpenVINO CPU then ONNX Runtime
CPU, the fault injected into OpenVINO after `--after` frames (EDGE_AGENT_FAULTS, persistent), and a
camera streaming at `--rate` fps until the tenant has served on ONNX Runtime for 2 s. Measured on
the camera's clock: from sending the first frame that met the fault to the first answer from ONNX
Runtime; frames answered with an error, unanswered, answered twice; the worst latency. Printed
beside the agent's own figure (`recovery_s` of the failover event). Request ids are new in every
run, and a run fails if the agent's telemetry counts a duplicate (an answer from memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.devtools.demo import start_agent, wait_ready
from agent.devtools.local_broker import LocalBroker
from bench.agent_counters import TELEMETRY_CONFIG, AgentCounters, check, exit_status
from bench.loadgen import run_prefix

SAMPLE = Path(__file__).resolve().parent.parent / "agent" / "samples" / "cat.jpg"
DEVICE = "failover"


class Camera:
    """Streams frames and keeps every answer (arrival time, payload) and every event."""

    def __init__(self, port: int) -> None:
        self.sent: dict[str, float] = {}
        self.answers: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(f"edge/{DEVICE}/result", 1), (f"edge/{DEVICE}/events", 1)])
        subscribed.wait(10)
        self.image = SAMPLE.read_bytes()
        self.prefix = run_prefix("failover")

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        now = time.monotonic()
        body = json.loads(message.payload)
        with self.cond:
            if message.topic.endswith("/events"):
                self.events.append(body)
            else:
                self.answers.setdefault(body["request_id"], []).append((now, body))
            self.cond.notify_all()

    def stream(self, rate: float, until: Any, timeout_s: float) -> None:
        """Frames at `rate` until `until()` holds (or the timeout)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            due = int((time.monotonic() - started) * rate) + 1
            while len(self.sent) < due:
                rid = f"{self.prefix}-f{len(self.sent)}"
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [("request_id", rid)]
                self.sent[rid] = time.monotonic()
                self.client.publish(f"edge/{DEVICE}/infer", self.image, qos=1, properties=props)
            with self.cond:
                if until():
                    return
            time.sleep(0.005)

    def served_on(self, backend: str) -> float | None:
        """When the first answer from `backend` arrived."""
        times = [
            t
            for got in self.answers.values()
            for t, body in got
            if body.get("tenant", {}).get("backend") == backend
        ]
        return min(times) if times else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure(
    kind: str, after: int, rate: float, stall_timeout_s: float, errors_to_fail: int
) -> dict[str, Any]:
    config = (
        'log_level = "WARNING"\n[scheduler]\nqueue_depth = 4096\ndrain_timeout_s = 1.0\n'
        f"[failover]\nstall_timeout_s = {stall_timeout_s}\nerrors_to_fail = {errors_to_fail}\n"
        "failback_after_s = 3600\n[placement]\ngeneration = 1\n[[placement.tenants]]\n"
        'model = "efficientnet-lite0"\n'
        'candidates = [{ backend = "openvino", device = "CPU" },\n'
        '  { backend = "onnxruntime", device = "cpu" }]\n' + TELEMETRY_CONFIG
    )
    os.environ["EDGE_AGENT_FAULTS"] = f"openvino:CPU:{kind}:after={after}"
    with (
        LocalBroker(extra_config="max_queued_messages 100000\n") as broker,
        tempfile.TemporaryDirectory() as tmp,
    ):
        agent = start_agent(broker.url, Path(tmp), DEVICE, config)
        counters = AgentCounters(broker.url, DEVICE)
        try:
            asyncio.run(wait_ready(broker.url, DEVICE, timeout_s=120))
            before = counters.read()
            camera = Camera(broker.port)
            onnx_for = lambda: camera.served_on("onnxruntime") or float("inf")  # noqa: E731
            camera.stream(rate, lambda: time.monotonic() - onnx_for() > 2.0, timeout_s=after / rate + 120)
            with camera.cond:
                camera.cond.wait_for(lambda: len(camera.answers) >= len(camera.sent), 60)
            camera.close()
            # The tenant moves between runtimes (its counters restart): check only for repeats.
            check(before, counters.read(), {}, f"failover on {kind}")
        finally:
            counters.close()
            agent.terminate()
            agent.wait(60)
    first_fault = camera.sent.get(f"{camera.prefix}-f{after}")
    recovered = camera.served_on("onnxruntime")
    answers = camera.answers
    latencies = [got[0][0] - camera.sent[rid] for rid, got in answers.items()]
    event = next((e for e in camera.events if e.get("kind") == "failover"), {})
    return {
        "frames": len(camera.sent),
        "recover_s": None if first_fault is None or recovered is None else recovered - first_fault,
        "agent_recovery_s": event.get("recovery_s"),
        "errors": sum(1 for got in answers.values() if "error" in got[0][1]),
        "unanswered": len(camera.sent) - len(answers),
        "twice": sum(1 for got in answers.values() if len(got) > 1),
        "worst_latency_s": max(latencies) if latencies else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__)
    parser.add_argument("--after", type=int, default=200, help="frames served before the fault")
    parser.add_argument("--rate", type=float, default=30.0, help="frames per second")
    parser.add_argument("--faults", default="hang,error", help="comma-separated: hang, error, slow")
    parser.add_argument("--stall-timeout", type=float, default=1.0, help="failover.stall_timeout_s")
    parser.add_argument("--errors-to-fail", type=int, default=3, help="failover.errors_to_fail")
    args = parser.parse_args(argv)
    rows = {
        kind: measure(kind, args.after, args.rate, args.stall_timeout, args.errors_to_fail)
        for kind in args.faults.split(",")
    }

    def fmt(value: object) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    print(
        f"OpenVINO CPU -> ONNX Runtime CPU, fault after {args.after} frames at {args.rate:g} fps, "
        f"stall_timeout_s = {args.stall_timeout:g}, errors_to_fail = {args.errors_to_fail}"
    )
    labels = {
        "frames": "frames sent",
        "recover_s": "fault -> serving again (s)",
        "agent_recovery_s": "agent's recovery_s (s)",
        "errors": "answered with an error",
        "unanswered": "unanswered",
        "twice": "answered twice",
        "worst_latency_s": "worst frame latency (s)",
    }
    print(f"{'':28}" + "".join(f"{kind:>10}" for kind in rows))
    for key, label in labels.items():
        print(f"{label:28}" + "".join(f"{fmt(row[key]):>10}" for row in rows.values()))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))

"""`python -m bench.pools`: device pools (docs/pools.md), measured on a private Mosquitto.

- `broker`: what Mosquitto does with a share's QoS 1 frames when a member dies: persistent session
  against none, frames in flight and frames published after the death; and whether a member whose
  Receive Maximum window is full is skipped.
- `scale`: one agent, then two agents in one pool, a stream at 2x one agent's capacity: frames
  served per second (target: the pool at least 1.8x one agent); latency p50/p99 of the pool against
  one agent at half its load (the same load per member), and the broker's round trip.
- `kill`: two members at 30 fps, one SIGKILLed mid-stream; the camera sends a frame again (same
  request id) after 1 s without an answer: frames lost, served twice (two members' answers for
  one request id), frames sent again, time from the kill until every frame it held was answered.
- `autoscale`: the console with a target on the pool, one member, a second device with the model
  outside the pool; load 30% -> 150% -> 30% of one agent: when the console adds a member, when the
  pool serves what is sent again, when it removes the member.
- `all` (the default): every one of them, printed and saved in bench/results/pools.json.

Agents serve with the `fake` backend (a fixed `--per-item-ms` per frame, one instance): their
capacity is known and the measurement is of the pool, not of this machine's CPU (shared by other
work). The agents are the real daemon in their own processes (`python -m bench.pools agent ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import http.cookiejar
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import cv2
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.devtools.local_broker import LocalBroker, free_port

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "pools.json"
MODEL, POOL = "efficientnet-lite0", "bench"
POOL_TOPIC = f"edge/pool/{POOL}/infer/{MODEL}"


def small_jpeg() -> bytes:
    """A 224x224 JPEG: decoding it costs the agents little CPU next to the fake runtime's time."""
    photo = cv2.imread(str(REPO / "agent" / "samples" / "cat.jpg"))
    if photo is None:
        raise RuntimeError("agent/samples/cat.jpg is missing")
    return bytes(cv2.imencode(".jpg", cv2.resize(photo, (224, 224)))[1])


# -- an agent with the fake backend, in its own process ---------------------------------------------
def agent_main(argv: list[str]) -> int:
    """`python -m bench.pools agent PORT DEVICE STATE PER_ITEM_MS POOL|- QUEUE_DEPTH`."""
    port, device, state, per_item_ms, pool, depth = argv
    from backends import registry

    registry.names = lambda include_hidden=False: list(registry.BUILTIN)  # the fake backend too
    from agent.protocol.schemas import BackendCapability
    from agent.service import daemon
    from agent.service.config import AgentConfig
    from agent.service.daemon import Agent

    probe = daemon.probe_backends_cached

    def with_fake(cache: Path) -> dict[str, BackendCapability]:
        """The console checks placements against what a device reports: report the fake runtime."""
        return {**probe(cache), "fake": BackendCapability(available=True, devices=["cpu"])}

    daemon.probe_backends_cached = with_fake

    tenant: dict[str, Any] = {"model": MODEL, "backend": "fake"}
    if pool != "-":
        tenant["pool"] = pool
    config = AgentConfig.model_validate(
        {
            "device_id": device,
            "state_dir": Path(state),
            "models_dir": REPO / "models",
            "log_level": "WARNING",
            "broker": {"host": "127.0.0.1", "port": int(port)},
            "scheduler": {"queue_depth": int(depth)},
            "metrics": {"telemetry_interval_s": 1.0},
            "placement": {"generation": 1, "tenants": [tenant]},
        }
    )
    agent = Agent(config, backend_options={"fake": {"per_item_ms": float(per_item_ms)}})

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await agent.run(stop)

    asyncio.run(main())
    return 0


class Agents:
    """Agent processes on one broker, ready once each announces itself (or reports ready)."""

    def __init__(self, port: int, per_item_ms: float, depth: int = 64) -> None:
        self.port, self.per_item_ms, self.depth = port, per_item_ms, depth
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-pools-")

    def start(self, device: str, pool: str | None) -> None:
        state = Path(self.tmp.name) / device
        state.mkdir(exist_ok=True)
        args = [str(self.port), device, str(state), str(self.per_item_ms), pool or "-", str(self.depth)]
        self.procs[device] = subprocess.Popen(
            [sys.executable, "-m", "bench.pools", "agent", *args], cwd=REPO, env={**os.environ}
        )

    def wait_members(self, devices: set[str], timeout_s: float = 120.0) -> None:
        seen: set[str] = set()
        done = threading.Event()
        client = mqtt(self.port)

        def on_message(_c: Any, _u: Any, message: Any) -> None:
            doc = json.loads(message.payload)
            if doc.get("open"):
                seen.add(doc["device_id"])
            if devices <= seen:
                done.set()

        client.on_message = on_message
        client.subscribe(f"edge/pool/{POOL}/members", qos=0)
        ok = done.wait(timeout_s)
        client.loop_stop()
        client.disconnect()
        if not ok:
            raise RuntimeError(f"members {sorted(devices - seen)} did not join within {timeout_s:g} s")

    def kill(self, device: str) -> None:
        self.procs[device].send_signal(signal.SIGKILL)
        self.procs[device].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.tmp.cleanup()


def mqtt(port: int) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    nodelay(client)
    client.loop_start()
    return client


def nodelay(client: paho.Client) -> None:
    """As the agent does: without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms per message."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- the camera ----------------------------------------------------------------------------------
class Camera:
    """Publishes frames at a fixed rate to the pool (QoS 1, response topic, correlation data); sends a
    frame again after `timeout_s` without an answer, up to `retries` times; keeps every answer."""

    def __init__(self, port: int, timeout_s: float = 30.0, retries: int = 0, topic: str = POOL_TOPIC) -> None:
        self.timeout_s, self.retries, self.topic = timeout_s, retries, topic
        self.image = small_jpeg()
        self.reply = f"edge/pool/{POOL}/reply/bench/{uuid.uuid4().hex}"
        self.sent: dict[str, float] = {}  # request id -> first send (monotonic)
        self.last_sent: dict[str, float] = {}
        self.tries: dict[str, int] = {}
        self.answer: dict[str, tuple[float, dict[str, Any]]] = {}  # first answer on the reply topic
        self.served_by: dict[str, set[str]] = {}  # from the pool's result topic
        self.cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(65535)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        nodelay(self.client)
        self.client.loop_start()
        self.client.subscribe([(self.reply, 1), (f"edge/pool/{POOL}/result", 1)])
        subscribed.wait(10)
        self._stop = threading.Event()
        self._retrier = threading.Thread(target=self._retry_loop, daemon=True)
        self._retrier.start()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        now = time.monotonic()
        doc = json.loads(message.payload)
        rid = doc.get("request_id")
        with self.cond:
            if message.topic == self.reply:
                if rid not in self.answer:
                    self.answer[rid] = (now, doc)
                self.cond.notify_all()
            elif "served_by" in doc and "error" not in doc:
                self.served_by.setdefault(rid, set()).add(doc["served_by"])

    def _publish(self, rid: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply
        props.CorrelationData = rid.encode()
        self.client.publish(self.topic, self.image, qos=1, properties=props)

    def _retry_loop(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self.cond:
                due = [
                    rid
                    for rid, at in self.last_sent.items()
                    if rid not in self.answer
                    and now - at >= self.timeout_s
                    and self.tries[rid] <= self.retries
                ]
                for rid in due:
                    self.tries[rid] += 1
                    self.last_sent[rid] = now
            for rid in due:
                if self.tries[rid] <= self.retries:
                    self._publish(rid)

    def stream(self, rate: float, seconds: float, at: dict[float, Any] | None = None) -> tuple[float, float]:
        """Send for `seconds`; `at` maps a second into the stream to a call made then (a kill).
        Returns (start, end) on the monotonic clock."""
        start = time.monotonic()
        pending = dict(sorted((at or {}).items()))
        for i in range(int(rate * seconds)):
            due = start + i / rate
            time.sleep(max(0.0, due - time.monotonic()))
            rid = f"f{i}-{uuid.uuid4().hex[:8]}"
            now = time.monotonic()
            with self.cond:
                self.sent[rid], self.last_sent[rid], self.tries[rid] = now, now, 1
            self._publish(rid)
            while pending and next(iter(pending)) <= i / rate:  # (right after a frame went out)
                pending.pop(next(iter(pending)))()
        return start, time.monotonic()

    def settle(self, wait_s: float) -> None:
        """Wait until every frame is answered, or `wait_s`."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.answer) >= len(self.sent), wait_s)

    def close(self) -> None:
        self._stop.set()
        self.client.loop_stop()
        self.client.disconnect()

    def figures(self, start: float, end: float) -> dict[str, Any]:
        with self.cond:
            ok = {r: a for r, a in self.answer.items() if "error" not in a[1]}
            latencies = sorted((a[0] - self.sent[r]) * 1000.0 for r, a in ok.items())
            # Throughput in the steady state: results that arrived from 2 s into the stream to its end.
            steady = sum(1 for a in ok.values() if start + 2.0 <= a[0] <= end)
            errors: dict[str, int] = {}
            for _at, doc in self.answer.values():
                if "error" in doc:
                    errors[doc["error"]["code"]] = errors.get(doc["error"]["code"], 0) + 1
            return {
                "sent": len(self.sent),
                "served": len(ok),
                "errors": errors,
                "unanswered": len(self.sent) - len(self.answer),
                "served_fps": round(steady / max(end - start - 2.0, 1e-6), 1),
                "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
                "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
                "served_twice": sum(1 for s in self.served_by.values() if len(s) > 1),
                "sent_again": sum(t - 1 for t in self.tries.values() if t > 1),
                "by_member": _count(d.get("served_by") for _t, d in ok.values()),
            }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[str(item)] = out.get(str(item), 0) + 1
    return out


def broker_rtt_ms(port: int, n: int = 200) -> float:
    """A QoS 1 publish to a topic this client subscribes to, until it comes back (median)."""
    client = mqtt(port)
    got = threading.Event()
    client.on_message = lambda *_: got.set()
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.subscribe("bench/rtt", qos=1)
    subscribed.wait(10)
    samples = []
    for _ in range(n):
        got.clear()
        t0 = time.perf_counter()
        client.publish("bench/rtt", b"x", qos=1)
        got.wait(5)
        samples.append((time.perf_counter() - t0) * 1000.0)
    client.loop_stop()
    client.disconnect()
    return round(statistics.median(samples), 3)


# -- scenarios ------------------------------------------------------------------------------------
def scale(per_item_ms: float, seconds: float) -> dict[str, Any]:
    capacity = 1000.0 / per_item_ms
    out: dict[str, Any] = {"capacity_fps_per_agent": capacity}
    for members in (1, 2):
        with LocalBroker() as broker:
            agents = Agents(broker.port, per_item_ms)
            try:
                names = {f"m{i}" for i in range(members)}
                for name in sorted(names):
                    agents.start(name, POOL)
                agents.wait_members(names)
                out["broker_rtt_ms"] = broker_rtt_ms(broker.port)
                runs = {"at_2x": 2 * capacity, "half_load": 0.5 * members * capacity}
                if members == 1:  # what one agent serves when it is sent just what it can serve
                    runs["at_1x"] = capacity
                for label, rate in runs.items():
                    camera = Camera(broker.port)
                    start, end = camera.stream(rate, seconds)
                    camera.settle(30)
                    out[f"{members}_member_{label}"] = {"rate_fps": rate, **camera.figures(start, end)}
                    camera.close()
                if members == 2:  # the control: the same two agents, each sent half on its own topic
                    out["2_agents_own_topics_half_load"] = own_topics(broker.port, capacity / 2, seconds)
            finally:
                agents.stop()
    one, two = out["1_member_at_2x"]["served_fps"], out["2_member_at_2x"]["served_fps"]
    out["throughput_ratio"] = round(two / one, 2) if one else None
    # Against one agent sent 1x (an agent at 2x also spends time refusing half of what it is sent).
    at_1x = out["1_member_at_1x"]["served_fps"]
    out["throughput_ratio_vs_1x"] = round(two / at_1x, 2) if at_1x else None
    p99_one, p99_two = out["1_member_half_load"]["p99_ms"], out["2_member_half_load"]["p99_ms"]
    out["p99_extra_ms"] = round(p99_two - p99_one, 1) if p99_one and p99_two else None
    return out


def own_topics(port: int, rate: float, seconds: float) -> dict[str, Any]:
    """Two cameras at `rate`, one per agent, on the agents' own topics (no pool): what the machine
    does to latency with two agents running, apart from the pool."""
    cameras = [Camera(port, topic=f"edge/m{i}/infer/{MODEL}") for i in range(2)]
    runs = [threading.Thread(target=lambda c=c: spans.append(c.stream(rate, seconds))) for c in cameras]
    spans: list[tuple[float, float]] = []
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    latencies: list[float] = []
    for camera in cameras:
        camera.settle(30)
        with camera.cond:
            latencies += [
                (a[0] - camera.sent[r]) * 1000.0 for r, a in camera.answer.items() if "error" not in a[1]
            ]
        camera.close()
    latencies.sort()
    return {
        "rate_fps": 2 * rate,
        "served": len(latencies),
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
    }


def kill(per_item_ms: float, rate: float, seconds: float, timeout_s: float, trials: int) -> dict[str, Any]:
    """`trials` runs; the totals, and each run."""
    runs = [kill_once(per_item_ms, rate, seconds, timeout_s) for _ in range(trials)]
    total = {k: sum(r[k] for r in runs) for k in ("sent", "served", "lost", "served_twice", "sent_again")}
    return {
        "rate_fps": rate,
        "retry_after_s": timeout_s,
        "trials": trials,
        **total,
        "worst_absorbed_after_s": max(r["absorbed_after_s"] for r in runs),
        "runs": runs,
    }


def kill_once(per_item_ms: float, rate: float, seconds: float, timeout_s: float) -> dict[str, Any]:
    with LocalBroker() as broker:
        agents = Agents(broker.port, per_item_ms)
        try:
            agents.start("m0", POOL)
            agents.start("m1", POOL)
            agents.wait_members({"m0", "m1"})
            camera = Camera(broker.port, timeout_s=timeout_s, retries=3)
            killed: list[float] = []

            def die() -> None:
                killed.append(time.monotonic())
                agents.kill("m1")

            start, end = camera.stream(rate, seconds, {seconds / 3: die})
            camera.settle(timeout_s * 5 + 10)
            camera.close()
        finally:
            agents.stop()
    figures = camera.figures(start, end)
    held = [r for r, t in camera.tries.items() if t > 1]
    last = max((camera.answer[r][0] for r in held if r in camera.answer), default=killed[0])
    return {
        "rate_fps": rate,
        "retry_after_s": timeout_s,
        **figures,
        "lost": figures["unanswered"],
        "absorbed_after_s": round(last - killed[0], 2),
    }


class ConsoleClient:
    def __init__(self, base: str, user: str, password: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        self.csrf = self.call("POST", "/api/login", {"username": user, "password": password})["csrf_token"]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(  # noqa: S310 (our own URL)
            self.base + path, method=method, data=None if body is None else json.dumps(body).encode()
        )
        req.add_header("Content-Type", "application/json")
        if getattr(self, "csrf", None):
            req.add_header("X-CSRF-Token", self.csrf)
        with self.opener.open(req, timeout=30) as res:
            return json.loads(res.read())


def autoscale(per_item_ms: float, phases: tuple[float, float, float]) -> dict[str, Any]:
    capacity = 1000.0 / per_item_ms
    low, high = 0.3 * capacity, 1.5 * capacity
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        console = subprocess.Popen(
            [sys.executable, "-m", "cloud_console", "serve", "--broker", broker.url, "--listen",
             f"127.0.0.1:{port}", "--db", f"{tmp}/console.db", "--demo-users", "admin=bench-pw"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        agents = Agents(broker.port, per_item_ms)
        try:
            agents.start("m0", POOL)
            agents.start("spare", None)  # has the model, outside the pool
            agents.wait_members({"m0"})
            deadline = time.monotonic() + 60
            while True:
                try:
                    api = ConsoleClient(f"http://127.0.0.1:{port}", "admin", "bench-pw")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            target = {"model": MODEL, "auto": True, "min_members": 1, "max_members": 2}
            api.call(
                "PUT",
                f"/api/pools/{POOL}/target",
                {**target, "up_after_s": 3, "down_after_s": 10, "cooldown_s": 5},
            )
            camera = Camera(broker.port, timeout_s=5.0, retries=1)
            marks: dict[str, float] = {}
            stop = threading.Event()
            members: list[tuple[float, int, list[dict[str, Any]]]] = []

            def watch() -> None:
                while not stop.wait(0.5):
                    pools = api.call("GET", "/api/pools")
                    for p in pools:
                        if p["pool"] == POOL:
                            members.append((time.monotonic(), len(p["members"]), p["actions"]))

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            start, _ = camera.stream(low, phases[0])
            marks["step_up"] = time.monotonic()
            camera.stream(high, phases[1])
            marks["step_down"] = time.monotonic()
            camera.stream(low, phases[2])
            camera.settle(20)
            stop.set()
            watcher.join()
            camera.close()
        finally:
            agents.stop()
            console.send_signal(signal.SIGTERM)
            console.wait(30)
    actions = members[-1][2] if members else []
    added = next((a for a in actions if a["action"] == "added"), None)
    removed = next((a for a in actions if a["action"] == "removed"), None)
    wall_to_mono = time.time() - time.monotonic()
    within = _within_target(camera, marks["step_up"], marks["step_down"])
    return {
        "capacity_fps_per_agent": capacity,
        "load_fps": {"low": low, "high": high},
        "added_after_s": round(added["ts"] - wall_to_mono - marks["step_up"], 1) if added else None,
        "within_target_after_s": round(within - marks["step_up"], 1) if within else None,
        "removed_after_drop_s": round(removed["ts"] - wall_to_mono - marks["step_down"], 1)
        if removed
        else None,
        "actions": [{k: a[k] for k in ("action", "device_id", "reason")} for a in actions],
        "frames": camera.figures(start, marks["step_down"] + phases[2]),
    }


def _within_target(camera: Camera, since: float, until: float) -> float | None:
    """The start of the first 2-second window after `since` whose frames were all answered with a
    result within 1 s (the pool keeps up again)."""
    with camera.cond:
        frames = [(t, camera.answer.get(r)) for r, t in camera.sent.items() if since <= t < until]
    t = since
    while t + 2.0 <= until:
        window = [(sent, a) for sent, a in frames if t <= sent < t + 2.0]
        if window and all(a is not None and "error" not in a[1] and a[0] - sent < 1.0 for sent, a in window):
            return t
        t += 0.5
    return None


# -- Mosquitto's shared subscriptions -----------------------------------------------------------------
MEMBER = r"""
import sys, paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
port, cid, rmax, expiry = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
ack = sys.argv[4] == "1"
c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5, manual_ack=not ack)
c.on_message = lambda cl, u, m: print("got", m.payload.decode(), flush=True)
p = Properties(PacketTypes.CONNECT); p.SessionExpiryInterval = expiry; p.ReceiveMaximum = rmax
c.on_connect = lambda cl, *a: cl.subscribe("$share/g/t", qos=1)
c.on_subscribe = lambda *a: print("subscribed", flush=True)
c.connect("127.0.0.1", port, clean_start=expiry == 0, properties=p)
c.loop_forever()
"""


def _member(port: int, cid: str, ack: bool, expiry: int) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", MEMBER, str(port), cid, "5", "1" if ack else "0", str(expiry)],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout or []:
            lines.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 10
    while "subscribed" not in lines and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, lines


def broker(expiry: int) -> dict[str, Any]:
    """Member A (Receive Maximum 5) never acknowledges; B does. 20 frames, A killed, 20 more, A back."""
    got = lambda lines: [x.split()[1] for x in lines if x.startswith("got")]  # noqa: E731
    with LocalBroker() as b:
        pub = mqtt(b.port)
        a, la = _member(b.port, "A", ack=False, expiry=expiry)
        bb, lb = _member(b.port, "B", ack=True, expiry=expiry)
        for i in range(20):
            pub.publish("t", f"m{i}", qos=1).wait_for_publish()
        time.sleep(1)  # (no event says "nothing more is coming": a bounded look)
        before = (len(got(la)), len(got(lb)))
        a.send_signal(signal.SIGKILL)
        a.wait()
        for i in range(20, 40):
            pub.publish("t", f"m{i}", qos=1).wait_for_publish()
        time.sleep(1)
        after_b = len(got(lb)) - before[1]
        a2, la2 = _member(b.port, "A", ack=True, expiry=expiry)
        time.sleep(1)
        back = len(got(la2))
        for proc in (a2, bb):
            proc.kill()
        pub.loop_stop()
    return {
        "session_expiry_s": expiry,
        "first_20": {"stuck_member_A": before[0], "member_B": before[1]},
        "after_A_killed_of_20": {"member_B": after_b},
        "handed_to_A_when_it_came_back": back,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        return agent_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.pools", description=__doc__)
    parser.add_argument(
        "what", nargs="?", default="all", choices=["all", "broker", "scale", "kill", "autoscale"]
    )
    parser.add_argument("--per-item-ms", type=float, default=20.0, help="the fake runtime's time per frame")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each scale run")
    parser.add_argument("--trials", type=int, default=5, help="kill runs")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    if args.what in ("all", "broker"):
        out["broker"] = [broker(3600), broker(0)]
    if args.what in ("all", "scale"):
        out["scale"] = scale(args.per_item_ms, args.seconds)
    if args.what in ("all", "kill"):
        out["kill"] = kill(args.per_item_ms, 30.0, 10.0, 1.0, args.trials)
    if args.what in ("all", "autoscale"):
        out["autoscale"] = autoscale(args.per_item_ms, (15.0, 30.0, 40.0))
    print(json.dumps(out, indent=2))
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**saved, **out}, indent=2) + "\n")  # (a part run updates its part)
    return 0


if __name__ == "__main__":
    sys.exit(main())

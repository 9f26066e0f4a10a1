"""`edge-agent demo`: a private Mosquitto, the agent, the sample photos, the answers in a table."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from agent.commands.client import InferClient, read_retained
from agent.devtools.local_broker import LocalBroker, free_port
from agent.protocol.topics import Topics

SAMPLES = Path(__file__).resolve().parent.parent / "samples"  # agent/samples (package data)
DEVICE_ID = "demo-device"
DETECTOR = "mb3-centernet"  # the COCO detector (docs/detection.md), beside the classifier


def start_agent(
    broker_url: str, state_dir: Path, device_id: str, config_text: str = "", log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    config = state_dir / "agent.toml"
    config.write_text(config_text)
    out = (log_path or state_dir / "agent.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--config",
            str(config),
            "--broker",
            broker_url,
            "--device-id",
            device_id,
            "--state-dir",
            str(state_dir),
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
    )


async def wait_ready(broker_url: str, device_id: str, timeout_s: float = 60.0) -> dict[str, object]:
    """Poll the retained status until the agent is online with every tenant ready."""
    deadline = time.monotonic() + timeout_s
    topic = Topics(device_id).status
    while time.monotonic() < deadline:
        status = await read_retained(broker_url, topic, timeout_s=1.0)
        tenants = (status or {}).get("placement", {}).get("tenants", []) if status else []
        if status and status.get("online") and tenants and all(t["state"] == "ready" for t in tenants):
            return status
        await asyncio.sleep(0.3)
    raise TimeoutError(f"agent {device_id} not ready after {timeout_s}s")


def start_console(broker_url: str, state: Path) -> tuple[subprocess.Popen[bytes] | None, str, str]:
    """The fleet console on a free loopback port, with demo users; (process, url, admin password)."""
    port = free_port()
    password = secrets.token_urlsafe(9)
    viewer = secrets.token_urlsafe(9)
    log = (state / "console.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloud_console",
            "serve",
            "--broker",
            broker_url,
            "--listen",
            f"127.0.0.1:{port}",
            "--db",
            str(state / "console.db"),
            "--demo-users",
            f"admin={password},viewer={viewer}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=1) as answer:  # noqa: S310 (http on loopback)
                if answer.status == 200:
                    return proc, url, f"admin / {password}   (viewer / {viewer})"
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    return None, url, ""


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 30.0) -> None:
    """SIGTERM (the agent drains and says goodbye), then SIGKILL after the grace period."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_demo(keep_running: bool | None = None, instances: int = 2) -> int:
    """Broker, agent, console, photos. Stays up for the console until Ctrl-C when run from a terminal."""
    if keep_running is None:
        keep_running = sys.stdin.isatty()
    photos = sorted(SAMPLES.glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no sample photos in {SAMPLES}")
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edge-demo-") as tmp:
        state = Path(tmp)
        print(f"* private Mosquitto on {broker.url}")
        config = (
            "[placement]\ngeneration = 0\n"
            f'[[placement.tenants]]\nmodel = "efficientnet-lite0"\nbackend = "onnxruntime"\n'
            f'device = "cpu"\ninstances = {instances}\n'
            # A cascade: the classifier also runs on the detector's dogs, in the detector's answer.
            f'cascade = {{ after = "{DETECTOR}", labels = ["dog"] }}\n'
            f'[[placement.tenants]]\nmodel = "{DETECTOR}"\nbackend = "onnxruntime"\ndevice = "cpu"\n'
        )
        agent = start_agent(broker.url, state, DEVICE_ID, config)
        print(f"* agent started as device {DEVICE_ID!r} (pid {agent.pid}, log {state / 'agent.log'})")
        console, url, login = start_console(broker.url, state)
        if console is not None:
            print(f"* console: {url}  login {login}  (pid {console.pid})")
        else:
            print(f"* console did not start; see {state / 'console.log'}")
        try:
            status = asyncio.run(wait_ready(broker.url, DEVICE_ID))
            tenants = status["placement"]["tenants"]  # type: ignore[index]
            for t in tenants:
                print(
                    f"* tenant {t['model']} on {t['backend']}:{t['device']} x{t['instances']}: {t['state']}"
                )
            print(f"* publishing {len(photos)} sample photos to {Topics(DEVICE_ID).infer}\n")
            rc = asyncio.run(_show(broker.url, photos))
            photo = SAMPLES / "detection" / "person.jpg"
            rc = max(rc, asyncio.run(_show_detections(broker.url, photo.name, photo.read_bytes())))
            print(f"\n* metrics: {state / 'metrics.db'} (one row per frame)")
            if keep_running:
                print(
                    f"* running; try: mosquitto_pub -h 127.0.0.1 -p {broker.port} "
                    f"-t {Topics(DEVICE_ID).infer} -f {photos[0]}\n"
                    f"  and: mosquitto_sub -h 127.0.0.1 -p {broker.port} -t 'edge/#' -v   (Ctrl-C stops)"
                )
                with contextlib.suppress(KeyboardInterrupt):
                    agent.wait()
            return rc
        finally:
            for proc in (agent, console):
                stop_process(proc)
            print("* agent, console and broker stopped")


async def _show(broker_url: str, photos: list[Path]) -> int:
    async with InferClient(broker_url, DEVICE_ID) as client:
        print(f"{'photo':16s} {'top-1 label':22s} {'score':>6s} {'latency':>9s}  {'served by':22s} runner-up")
        print("-" * 100)
        failures = 0
        for path in photos:
            reply = await client.infer(path.read_bytes(), timeout_s=30.0)
            if not reply.ok:
                failures += 1
                print(f"{path.name:16s} error: {reply.payload['error']}")
                continue
            top = reply.payload["top"]
            tenant = reply.payload["tenant"]
            served = f"{tenant['backend']}:{tenant['device']}#{tenant['instance']}"
            print(
                f"{path.name:16s} {top[0]['label']:22s} {top[0]['score']:6.3f} {reply.latency_ms:7.1f}ms  "
                f"{served:22s} {top[1]['label']} ({top[1]['score']:.3f})"
            )
        # Then a burst, to show concurrency across instances.
        start = time.perf_counter()
        futures = [await client.send(p.read_bytes()) for p in photos * 20]
        replies = await asyncio.gather(*(asyncio.wait_for(f, 60) for f in futures))
        elapsed = time.perf_counter() - start
        used = sorted({r.payload["tenant"]["instance"] for r in replies if r.ok})
        print(
            f"\nburst: {len(replies)} frames answered in {elapsed:.2f}s "
            f"({len(replies) / elapsed:.0f} frames/s), instances used: {used}"
        )
        return 1 if failures else 0


async def _show_detections(broker_url: str, name: str, image: bytes) -> int:
    """One photo to the detector: its boxes (0..1 of the frame), as docs/detection.md describes."""
    async with InferClient(broker_url, DEVICE_ID) as client:
        reply = await client.infer(image, model=DETECTOR, timeout_s=60.0)
    if not reply.ok:
        print(f"\ndetection: {name}: error {reply.payload['error']}")
        return 1
    found = reply.payload["detections"]
    print(f"\ndetection: {name} -> {DETECTOR}, {len(found)} found in {reply.latency_ms:.0f} ms")
    for d in found:
        box = d["box"]
        # A box the cascade classified (the dog): its breed, the classifier's best class.
        breed = f"  -> {d['classes'][0]['label']} {d['classes'][0]['score']:.3f}" if d.get("classes") else ""
        print(
            f"  {d['label']:14s} {d['score']:.3f}  x {box['x_min']:.2f}..{box['x_max']:.2f}  "
            f"y {box['y_min']:.2f}..{box['y_max']:.2f}{breed}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_demo(keep_running=os.environ.get("KEEP") == "1" or None))

"""`python -m bench.rollout`: a staged rollout of a new model version to a simulated fleet, and of a
faulty one, with the figures docs/fleet.md#measured quotes.

Starts a private Mosquitto, the console (`edge-console serve`, a subprocess as in production) and
`--devices` simulated devices (cloud_console/simulator.py) with a fault: a share of them fails to
load version 9.0.0 (`--fault-kind load`, or answers errors / doubles latency with it). Uploads two
small model versions to the console's model store with a bearer token, then:

1. rolls 2.0.0 out to every device in 4 waves (1, 10%, 50%, all) and waits until it completes:
   wall time, per-wave times, and that every device's status runs 2.0.0;
2. rolls 9.0.0 out the same way with the canary faulty: it must stop at wave 1 and roll back by
   itself. Prints the time from the gate failing to every device of the wave serving its old version
   again (the console's own figure, and one measured here from the devices), and that no device past
   wave 1 got it;
3. the same with a healthy canary: wave 2 (10%, the fault's share of it faulty) fails, and its
   devices are restored: the same times, for a wave of 99 devices;
4. rolls the first rollout back by hand: the time until all devices serve 1.0.0 again.

With `--agents N` (default 2) real agents (`edge-agent run`, the real model files delivered and
loaded) join the target, sorted into the last wave, while a client sends each `--fps` frames a
second and counts the answers: frames unanswered, answered twice, error answers.

Figures, not a test. The simulated devices install a delivered version at once (no download).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.devtools.local_broker import LocalBroker, free_port
from cloud_console.simulator import FleetSimulator, SimFault

ROOT = Path(__file__).resolve().parent.parent
MODEL = "efficientnet-lite0"
MODEL_DIR = ROOT / "models" / MODEL
IMAGE = ROOT / "agent" / "samples" / "cat.jpg"
AGENT_PREFIX = "zz-agent"  # sorts after the simulated devices: real agents are in the last wave


def real_model(folder: Path, version: str) -> Path:
    """The bundled classifier as `version` (model.toml, model.onnx, labels): what real agents load."""
    target = folder / f"real-{version}" / MODEL
    target.mkdir(parents=True)
    for name in ("model.onnx", "labels.txt"):
        (target / name).write_bytes((MODEL_DIR / name).read_bytes())
    toml = (MODEL_DIR / "model.toml").read_text().replace('version = "1.0.0"', f'version = "{version}"')
    (target / "model.toml").write_text(toml)
    return target


class Frames:
    """Frames at `fps` to each real agent, every answer counted by request id (a camera's view)."""

    def __init__(self, host: str, port: int, devices: list[str], fps: float) -> None:
        self.devices, self.fps = devices, fps
        self.frame = base64.b64encode(IMAGE.read_bytes()).decode()
        self.sent: set[str] = set()
        self.answers: dict[str, int] = {}
        self.codes: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-frames-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        for device in devices:
            self.client.subscribe(f"edge/{device}/result", qos=1)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        doc = json.loads(message.payload)
        with self.lock:
            rid = doc.get("request_id", "")
            self.answers[rid] = self.answers.get(rid, 0) + 1
            if "error" in doc:
                code = doc["error"]["code"]
                self.codes[code] = self.codes.get(code, 0) + 1

    def _run(self) -> None:
        n, next_at = 0, time.monotonic()
        while not self.stop_flag.is_set():
            for device in self.devices:
                rid = f"{device}-{n}"
                with self.lock:
                    self.sent.add(rid)
                body = json.dumps({"request_id": rid, "image_b64": self.frame}).encode()
                self.client.publish(f"edge/{device}/infer/{MODEL}", body, qos=1)
            n += 1
            next_at += 1 / self.fps
            self.stop_flag.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        self.thread.start()

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        self.stop_flag.set()
        self.thread.join(10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.sent <= set(self.answers):
                    break
            time.sleep(0.2)
        self.client.loop_stop()
        self.client.disconnect()
        with self.lock:
            return {
                "frames_sent": len(self.sent),
                "unanswered": len(self.sent - set(self.answers)),
                "answered_twice": sum(1 for n in self.answers.values() if n > 1),
                "error_answers": dict(self.codes),
            }


def start_agents(
    n: int, broker_url: str, base: str, token: str, workdir: Path
) -> list[subprocess.Popen[bytes]]:
    agents = []
    for i in range(n):
        state = workdir / f"agent-{i}"
        state.mkdir()
        (state / "agent.toml").write_text(
            'tags = {site = "lab"}\n[metrics]\ntelemetry_interval_s = 1\n'
            f'[models]\nconsole_url = "{base}"\ntoken = "{token}"\n'
        )
        run = [sys.executable, "-m", "agent", "run", "--config", str(state / "agent.toml")]
        run += ["--broker", broker_url, "--device-id", f"{AGENT_PREFIX}-{i}", "--state-dir", str(state)]
        log = (state / "agent.log").open("ab")
        agents.append(subprocess.Popen(run, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return agents


def tiny_model(folder: Path, version: str, name: str = MODEL) -> Path:
    """A valid model folder of a few bytes (the simulator never loads it): model.toml, labels, onnx."""
    target = folder / f"{name}-{version}" / name
    target.mkdir(parents=True)
    blob = f"not a real network: {name} {version}\n".encode()
    (target / "model.onnx").write_bytes(blob)
    (target / "labels.txt").write_text("cat\ndog\n")
    (target / "model.toml").write_text(
        f'name = "{name}"\nversion = "{version}"\nlabels = "labels.txt"\n\n'
        '[input]\nlayout = "NCHW"\nsize = [224, 224]\ndtype = "float32"\n'
        "mean = [127.0, 127.0, 127.0]\nstd = [128.0, 128.0, 128.0]\n\n"
        f'[artifacts.onnx]\nfile = "model.onnx"\nsha256 = "{hashlib.sha256(blob).hexdigest()}"\n'
    )
    return target


def tar_gz(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


class Api:
    """The console's REST API with a bearer token (as `edge-console rollout` uses it)."""

    def __init__(self, base: str, token: str = "") -> None:
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)  # noqa: S310 - our console
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/gzip" if raw is not None else "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as res:  # noqa: S310
                return json.loads(res.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc


def start_console(broker_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], Api]:
    port = free_port()
    password = secrets.token_urlsafe(9)
    log = (workdir / "console.log").open("ab")
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
            str(workdir / "console.db"),
            "--demo-users",
            f"admin={password},viewer={password}x",
            "--log-level",
            "WARNING",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if Api(base).call("GET", "/healthz")["mqtt_connected"]:
                break
        except (OSError, RuntimeError):
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the console did not start; see console.log")
        time.sleep(0.2)
    # A session to make an API token, then the token for everything else.
    jar = urllib.request.HTTPCookieProcessor()
    opener = urllib.request.build_opener(jar)
    login = urllib.request.Request(  # noqa: S310
        base + "/api/login",
        data=json.dumps({"username": "admin", "password": password}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    csrf = json.loads(opener.open(login).read())["csrf_token"]
    make = urllib.request.Request(  # noqa: S310
        base + "/api/tokens",
        data=json.dumps({"name": "bench"}).encode(),
        headers={"Content-Type": "application/json", "X-CSRF-Token": csrf},
        method="POST",
    )
    token = json.loads(opener.open(make).read())["token"]
    return proc, Api(base, token)


def wait(fn: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.25)
    raise RuntimeError(f"gave up waiting for {what}")


def versions_running(sim: FleetSimulator, device_ids: list[str]) -> dict[str, str | None]:
    """The version of MODEL each device's simulated status says is ready (None: not ready)."""
    out: dict[str, str | None] = {}
    with sim.lock:
        for device_id in device_ids:
            device = sim.device_map.get(device_id)
            if device is None:  # a real agent
                continue
            tenant = device.tenants.get(MODEL)
            pending = device.target is not None
            out[device_id] = tenant.spec.version if tenant is not None and not pending else None
    return out


def agent_version(api: Api, device_id: str) -> str | None:
    """The version of MODEL a real agent serves, from its status in the console (None: not ready)."""
    status = api.call("GET", f"/api/devices/{device_id}")["status"] or {}
    tenants = [t for t in (status.get("placement") or {}).get("tenants", []) if t["model"] == MODEL]
    ready = [t for t in tenants if t["state"] == "ready"]
    if len(ready) != 1 or len(tenants) != 1:
        return None
    return ready[0].get("serving_version") or ready[0].get("version")


def summary(api: Api, rollout_id: str) -> dict[str, Any]:
    """The rollout's summary row (light: the detail of 1,000 devices is not built for each poll)."""
    return next(r for r in api.call("GET", "/api/rollouts") if r["id"] == rollout_id)


def run_rollout(api: Api, spec: dict[str, Any], timeout: float) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    rollout = api.call("POST", "/api/rollouts", spec)

    def done() -> Any:
        return summary(api, rollout["id"])["state"] in ("completed", "rolled_back", "aborted", "paused")

    wait(done, f"rollout {rollout['id']}", timeout)
    took = time.monotonic() - started
    return api.call("GET", f"/api/rollouts/{rollout['id']}"), took


def faulty_wave(api: Api, sim: FleetSimulator, spec: dict[str, Any]) -> dict[str, Any]:
    """Roll `spec` out until a wave fails; time its rollback as the console and the devices see it."""
    rollout = api.call("POST", "/api/rollouts", spec)
    started = time.monotonic()

    wait(lambda: summary(api, rollout["id"])["failed_at"], "a wave to fail", 900)
    seen_failed = time.monotonic()
    detail = api.call("GET", f"/api/rollouts/{rollout['id']}")
    index = detail["current_wave"]
    wave = [d["device_id"] for d in detail["wave_list"][index]["devices"]]
    wait(
        lambda: all(v == "2.0.0" for v in versions_running(sim, wave).values()),
        "the failed wave serving 2.0.0 again",
        900,
    )
    restored = time.monotonic()
    wait(lambda: summary(api, rollout["id"])["state"] == "rolled_back", "the rollout to say rolled back", 600)
    detail = api.call("GET", f"/api/rollouts/{rollout['id']}")
    later = [d["device_id"] for w in detail["wave_list"][index + 1 :] for d in w["devices"]]
    return {
        "stopped_at_wave": index + 1,
        "wave_devices": len(wave),
        "failed_devices": sum(1 for d in detail["wave_list"][index]["devices"] if d["reason"]),
        "to_gate_failure_s": round(seen_failed - started, 1),
        "rollback_s_console": round(detail["rolled_back_at"] - detail["failed_at"], 2),
        "rollback_s_devices": round(restored - seen_failed, 2),
        "later_waves_touched": sum(
            1 for w in detail["wave_list"][index + 1 :] for d in w["devices"] if d["state"] != "cancelled"
        ),
        "later_waves_on_2_0_0": sum(1 for v in versions_running(sim, later).values() if v == "2.0.0"),
        "later_waves_devices": len(later),
        "reason": detail["reason"][:200],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0, help="telemetry interval of the devices, s")
    parser.add_argument("--soak", type=float, default=5.0, help="soak time of each wave, s")
    parser.add_argument("--fault-kind", default="load", choices=["load", "errors", "slow"])
    parser.add_argument("--fault-share", type=float, default=0.3)
    parser.add_argument("--waves", default="1,10%,50%,all")
    parser.add_argument("--agents", type=int, default=2, help="real agents beside the simulated devices")
    parser.add_argument("--max-p95-factor", type=float, help="the latency gate (default: the default 1.5)")
    parser.add_argument("--fps", type=float, default=10.0, help="frames a second to each real agent")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"devices": args.devices, "waves": args.waves, "soak_s": args.soak}
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp, LocalBroker() as broker:
        workdir = Path(tmp)
        # The faulty version hits the first device (the canary) for sure, and a share of the rest.
        fault = SimFault(args.fault_kind, args.fault_share, "9.0.0", MODEL)
        sim = FleetSimulator(
            broker.host,
            broker.port,
            args.devices,
            interval_s=args.interval,
            per_connection=100,
            faults=(fault,),
        )
        sim.start()
        proc, api = start_console(broker.url, workdir)
        agents = start_agents(args.agents, broker.url, api.base, api.token, workdir)
        agent_ids = [f"{AGENT_PREFIX}-{i}" for i in range(args.agents)]
        frames: Frames | None = None
        try:
            total = args.devices + args.agents
            wait(lambda: api.call("GET", "/api/stats")["online"] == total, "every device online", 300)
            for version in ("2.0.0", "9.0.0"):  # real model files: the real agents load them
                api.call("POST", "/api/models", raw=tar_gz(real_model(workdir, version)))
            if agent_ids:
                frames = Frames(broker.host, broker.port, agent_ids, args.fps)
                frames.start()
            gates: dict[str, float] = {"soak_s": args.soak}  # else the defaults: p95 1.5x, fps 70%, errors 1%
            if args.max_p95_factor is not None:
                gates["max_p95_factor"] = args.max_p95_factor
            spec = {
                "change": {"model": MODEL, "set": {"version": "2.0.0"}},
                "waves": args.waves,
                "gates": gates,
            }
            good, took = run_rollout(api, spec, 1800)
            ids = [
                d["device_id"]
                for w in good["wave_list"]
                for d in w["devices"]
                if d["device_id"] in sim.device_map
            ]
            running = versions_running(sim, ids)
            figures["good"] = {
                "state": good["state"],
                "reason": good["reason"],
                "wall_s": round(took, 1),
                "targeted": len(ids),
                "on_new_version": sum(1 for v in running.values() if v == "2.0.0"),
                "real_agents_on_new_version": [agent_version(api, a) for a in agent_ids],
                "waves": [
                    {
                        "size": w["size"],
                        "devices": len(w["devices"]),
                        "s": round((w["decided_at"] or 0) - (w["started_at"] or 0), 1),
                        "worst": {k: v for k, v in w["figures"].items() if k.startswith("worst_")},
                    }
                    for w in good["wave_list"]
                ],
            }
            print(json.dumps({"good": figures["good"]}, indent=1), flush=True)
            if good["state"] != "completed":
                raise RuntimeError(f"the good rollout did not complete: {good['reason']}")

            # The canary is whichever device sorts first: give the fault a device it is sure to hit.
            bad_spec = {**spec, "change": {"model": MODEL, "set": {"version": "9.0.0"}}}
            first_wave = good["wave_list"][0]["devices"][0]["device_id"]
            with sim.lock:
                for device in sim.devices:
                    if device.device_id == first_wave:
                        device.faults = (SimFault(args.fault_kind, 1.0, "9.0.0", MODEL),)
            figures["faulty"] = {
                "fault": f"{args.fault_kind} on the canary (and {args.fault_share:.0%} of the rest)",
                **faulty_wave(api, sim, bad_spec),
            }
            print(json.dumps({"faulty": figures["faulty"]}, indent=1), flush=True)

            # The same faulty version with a healthy canary: the fault shows in wave 2 (its share of
            # those devices), which fails and is restored: the rollback of a wave at scale.
            with sim.lock:
                sim.device_map[first_wave].faults = ()
            figures["faulty_later"] = faulty_wave(api, sim, bad_spec)
            print(json.dumps({"faulty_later": figures["faulty_later"]}, indent=1), flush=True)

            # A person rolls the good rollout back: every device restored to 1.0.0.
            started = time.monotonic()
            api.call("POST", f"/api/rollouts/{good['id']}/rollback")
            wait(
                lambda: all(v == "1.0.0" for v in versions_running(sim, ids).values()),
                "every device serving 1.0.0 again",
                900,
            )
            restored_s = time.monotonic() - started
            wait(
                lambda: summary(api, good["id"])["state"] == "rolled_back",
                "the rollout to say rolled back",
                600,
            )
            detail = api.call("GET", f"/api/rollouts/{good['id']}")
            wait(
                lambda: all(agent_version(api, a) == "1.0.0" for a in agent_ids),
                "real agents back on 1.0.0",
                300,
            )
            figures["manual_rollback"] = {
                "devices": len(ids),
                "real_agents": [agent_version(api, a) for a in agent_ids],
                "s_devices": round(restored_s, 1),
                "s_console": round(detail["rolled_back_at"] - detail["failed_at"], 1),
                "counts": detail["counts"],
            }
            print(json.dumps({"manual_rollback": figures["manual_rollback"]}, indent=1), flush=True)
            if frames is not None:
                figures["real_agent_frames"] = frames.finish()
                frames = None
                print(json.dumps({"real_agent_frames": figures["real_agent_frames"]}), flush=True)
        finally:
            if frames is not None:
                frames.finish(5)
            for agent in agents:
                agent.send_signal(signal.SIGTERM)
            for agent in agents:
                try:
                    agent.wait(30)
                except subprocess.TimeoutExpired:
                    agent.kill()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            sim.stop()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.delivery`: how long delivering the 8 MB detector takes, to 1 and to N agents at once.

Starts a private Mosquitto, the console (`edge-console serve`, a subprocess as in production) and N
real agents (`edge-agent run`, each with an empty placement so that only delivery runs), uploads
mb3-centernet (model.onnx, 8 MB, with its model.toml and labels) through the REST API with a bearer
token, delivers it to every agent at once, and waits until each agent's status lists it installed.
Prints, per round: wall time from the first delivery request to the last install, the bytes moved,
the aggregate throughput, and the console's CPU seconds while serving (from /proc). Figures, not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.devtools.local_broker import LocalBroker, free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "mb3-centernet"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def request(base: str, method: str, path: str, token: str, body: bytes | None = None, kind: str = "") -> Any:
    req = urllib.request.Request(base + path, data=body, method=method)  # noqa: S310 (our own URL)
    req.add_header("Authorization", f"Bearer {token}")
    if kind:
        req.add_header("Content-Type", kind)
    with urllib.request.urlopen(req, timeout=120) as res:  # noqa: S310
        return json.loads(res.read() or b"null")


def archive(version: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("model.toml", "model.onnx", "labels.txt"):
            data = (MODEL / name).read_bytes()
            if name == "model.toml":
                data = data.replace(b'version = "1.0.0"', f'version = "{version}"'.encode())
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wait_installed(base: str, token: str, version: str, devices: list[str], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = request(base, "GET", "/api/models", token)
        have: list[str] = next((e["devices"] for e in entries if e["version"] == version), [])
        if set(devices) <= set(have):
            return time.monotonic()
        time.sleep(0.1)  # polls the console's view, which follows the devices' status
    raise TimeoutError(f"not every device installed {version} within {timeout:g} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__)
    parser.add_argument("--agents", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20])
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    most = max(args.agents)
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp, LocalBroker() as broker:
        work = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        password = secrets.token_urlsafe(12)
        serve = [sys.executable, "-m", "cloud_console", "serve", "--broker", broker.url]
        serve += ["--listen", f"127.0.0.1:{port}", "--db", str(work / "console.db")]
        serve += ["--demo-users", f"admin={password}", "--log-level", "WARNING"]
        console = subprocess.Popen(serve, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        agents: list[subprocess.Popen[bytes]] = []
        try:
            token = ""
            for _ in range(300):
                try:
                    token = make_token(base, password)
                    break
                except OSError:
                    time.sleep(0.2)  # the console is still starting
            for i in range(most):
                state = work / f"agent-{i}"
                state.mkdir()
                (state / "agent.toml").write_text(
                    f'[models]\nconsole_url = "{base}"\ntoken = "{token}"\n[placement]\ntenants = []\n'
                )
                run = [sys.executable, "-m", "agent", "run", "--config", str(state / "agent.toml")]
                run += ["--broker", broker.url, "--device-id", f"bench-{i}", "--state-dir", str(state)]
                agents.append(
                    subprocess.Popen(run, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            for i in range(most):
                wait_device(base, token, f"bench-{i}", args.timeout)
            size = (MODEL / "model.onnx").stat().st_size
            print(f"model.onnx {size / 2**20:.1f} MB; {most} agents running; console pid {console.pid}")
            print("agents  seconds  MB moved  MB/s   console CPU s")
            for round_, n in enumerate(args.agents):
                version = f"2.0.{round_}"
                request(base, "POST", "/api/models", token, archive(version), "application/gzip")
                devices = [f"bench-{i}" for i in range(n)]
                cpu0 = cpu_seconds(console.pid)
                start = time.monotonic()
                for device in devices:
                    body = json.dumps({"model": "mb3-centernet", "version": version}).encode()
                    request(base, "POST", f"/api/devices/{device}/models", token, body, "application/json")
                end = wait_installed(base, token, version, devices, args.timeout)
                cpu = cpu_seconds(console.pid) - cpu0
                moved = n * sum(
                    (MODEL / f).stat().st_size for f in ("model.toml", "model.onnx", "labels.txt")
                )
                seconds = end - start
                mb = moved / 2**20
                print(f"{n:6d}  {seconds:7.2f}  {mb:8.1f}  {mb / seconds:5.1f}  {cpu:13.2f}")
        finally:
            for proc in [*agents, console]:
                proc.send_signal(signal.SIGTERM)
            for proc in [*agents, console]:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


def make_token(base: str, password: str) -> str:
    req = urllib.request.Request(  # noqa: S310 (our own URL)
        base + "/api/login",
        data=json.dumps({"username": "admin", "password": password}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(req, timeout=10) as res:
        csrf = json.loads(res.read())["csrf_token"]
    req = urllib.request.Request(  # noqa: S310
        base + "/api/tokens",
        data=json.dumps({"name": "bench", "role": "admin"}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-CSRF-Token": csrf},
    )
    with opener.open(req, timeout=10) as res:
        token: str = json.loads(res.read())["token"]
    return token


def wait_device(base: str, token: str, device: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request(base, "GET", f"/api/devices/{device}", token)
            return
        except OSError:
            time.sleep(0.2)  # not reported yet
    raise TimeoutError(f"{device} did not report within {timeout:g} s")


if __name__ == "__main__":
    sys.exit(main())

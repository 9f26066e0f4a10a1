"""systemd integration: READY/WATCHDOG datagrams, SIGTERM drain, units, install script, doctor, /metrics."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.devtools.local_broker import LocalBroker, free_port
from tests.conftest import REPO, AgentProcess, Collector, sample

pytestmark = pytest.mark.timeout(300)
UNITS = REPO / "systemd"
needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.5)
    return sock


def read_datagrams(sock: socket.socket, until, timeout: float = 60.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return got


def test_ready_and_watchdog_datagrams_even_with_broker_down(tmp_path):
    sock = notify_socket(tmp_path)
    dead_broker = LocalBroker()  # never started: nothing listens on its port
    agent = AgentProcess(
        dead_broker,
        tmp_path,
        "sd1",
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"},
    )
    agent.start()
    try:
        got = read_datagrams(sock, lambda g: sum("WATCHDOG=1" in m for m in g) >= 3)
        ready = [m for m in got if "READY=1" in m]
        assert ready, got
        assert "serving efficientnet-lite0" in ready[0]
        before_ready = got[: got.index(ready[0])]
        assert any("EXTEND_TIMEOUT_USEC=" in m for m in before_ready), (
            "long start steps extend the start timeout"
        )
        assert got.index(ready[0]) < min(i for i, m in enumerate(got) if "WATCHDOG=1" in m) + 1
        assert sum("WATCHDOG=1" in m for m in got) >= 3
        agent.proc.send_signal(signal.SIGTERM)
        stopping = read_datagrams(sock, lambda g: any("STOPPING=1" in m for m in g), timeout=30)
        assert any("STOPPING=1" in m for m in stopping)
        assert agent.proc.wait(30) == 0
    finally:
        agent.stop()
        sock.close()


def test_sigterm_drain_answers_every_accepted_frame_and_loses_none(broker, tmp_path):
    config = "[scheduler]\ndrain_timeout_s = 0.3\nqueue_depth = 500\n"
    agent = AgentProcess(broker, tmp_path, "drain1", config).start()
    agent.wait_ready()
    c = Collector(broker.port, ["edge/drain1/result"])
    try:
        image = sample("cat.jpg")
        for i in range(80):
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = f"d{i}".encode()
            c.client.publish("edge/drain1/infer", image, qos=1, properties=props)
        # Stop once serving has begun (the first answer is in), with most frames still to be served.
        c.wait_for(lambda r: len(r) >= 1, "edge/drain1/result", timeout=60)
        assert agent.stop() == 0, agent.log()[-2000:]
        first_run = c.json("edge/drain1/result")
        assert first_run, "some frames were served before the stop"
        # Frames not yet delivered wait in the broker's persistent session; a restart serves them.
        agent.start()
        agent.wait_ready()
        results = c.wait_for(
            lambda r: len({x["request_id"] for x in r}) >= 80, "edge/drain1/result", timeout=90
        )
    finally:
        c.close()
        agent.stop()
    counts = Counter(r["request_id"] for r in results)
    assert set(counts) == {f"d{i}" for i in range(80)}
    assert set(counts.values()) == {1}, "answered exactly once"
    codes = Counter(r["error"]["code"] if "error" in r else "ok" for r in results)
    assert set(codes) <= {"ok", "shutting_down"}


@pytest.fixture(scope="module")
def console_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One staged install with the console, read (not changed) by each unit's check."""
    stage = tmp_path_factory.mktemp("stage")
    env = {**os.environ, "PIP_ARGS": "--no-deps", "EXTRAS": ""}
    done = subprocess.run(
        ["bash", str(UNITS / "install.sh"), "--root", str(stage), "--console"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return stage


@needs_systemd
@pytest.mark.parametrize("unit", ["edge-agent.service", "edge-console.service"])
def test_units_verify_clean_and_agent_is_hardened(unit, console_stage, tmp_path):
    stage = console_stage
    staged = (stage / "etc/systemd/system" / unit).read_text()
    # Verify against the staged executables (the unit names /opt/edge-agent; here it lives under stage/).
    local = tmp_path / unit
    local.write_text(staged.replace("/opt/edge-agent", str(stage / "opt/edge-agent")))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and verify.stdout == "" and verify.stderr == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    level = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout).group(1))
    assert level <= 3.0, security.stdout[-2000:]


def unit_settings(unit: str) -> dict[str, list[str]]:
    """Each `Key=value` of a shipped unit, values in order (systemd allows a key several times)."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith(("#", ";")):
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_agent_unit_allows_every_device_class_the_backends_declare():
    """A backend declares the device classes its nodes need (`unit_devices`); the unit allows exactly
    those, so a runtime added or changed cannot be silently locked out (or leave stale holes)."""
    from backends import registry

    allowed = {value.split()[0] for value in unit_settings("edge-agent.service")["DeviceAllow"]}
    declared = {d for info in registry.declarations().values() for d in info.unit_devices}
    assert declared - allowed == set(), "add DeviceAllow= lines to systemd/edge-agent.service"
    assert allowed - declared == set(), "no backend declares these (unit_devices in backends/*.py)"
    assert unit_settings("edge-agent.service")["DevicePolicy"] == ["closed"]


TELEMETRY_PROBE = (
    "from agent.observability.device_stats import DeviceStats as S; "
    "print(S.load_1m() is not None, bool(S.system_memory()))"
)


def test_the_agent_unit_leaves_telemetry_its_host_figures_in_proc(tmp_path):
    """Telemetry reports the host's load and memory (/proc/loadavg, /proc/meminfo). The unit's
    /proc options are applied to a private /proc, as systemd mounts it, and telemetry read there."""
    settings = unit_settings("edge-agent.service")
    options = []
    if settings.get("ProtectProc", ["default"])[-1] in ("invisible", "noaccess", "ptraceable"):
        options.append(f"hidepid={settings['ProtectProc'][-1]}")
    if settings.get("ProcSubset", ["all"])[-1] == "pid":
        options.append("subset=pid")
    mount = f"mount -t proc -o {','.join(options) or 'defaults'} proc /proc"
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "-p",
            "--fork",
            "sh",
            "-c",
            f"{mount} && exec {sys.executable} -c '{TELEMETRY_PROBE}'",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    if "mount" in probe.stderr or "unshare" in probe.stderr:
        pytest.skip(f"cannot mount a private /proc here: {probe.stderr.strip()[:200]}")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["True", "True"], "load or memory hidden from telemetry by the unit"


def test_install_script_stages_upgrades_and_uninstalls(tmp_path):
    stage = tmp_path / "root"
    env = {**os.environ, "PIP_ARGS": "--no-deps", "EXTRAS": ""}
    script = ["bash", str(UNITS / "install.sh"), "--root", str(stage)]
    done = subprocess.run(script, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr
    prefix = stage / "opt/edge-agent"
    assert (prefix / "venv/bin/edge-agent").exists()
    assert (prefix / "src/models/efficientnet-lite0/model.onnx").exists()
    config = stage / "etc/edge-agent/agent.toml"
    assert 'models_dir = "/opt/edge-agent/src/models"' in config.read_text()
    assert (
        "ExecStart=/opt/edge-agent/venv/bin/edge-agent run"
        in (stage / "etc/systemd/system/edge-agent.service").read_text()
    )
    # The config template is valid for the agent as shipped.
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "doctor",
            "--config",
            str(config),
            "--no-broker",
            "--models",
            str(prefix / "src/models"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # Only the project is copied, not what a checkout collects (caches, GPU bundles, databases).
    staged = {p.name for p in (prefix / "src").iterdir()}
    assert not staged & {".venv", ".git", ".hypothesis", ".whl", ".gpu-broker", ".mypy_cache"}, staged
    assert not list((prefix / "src").rglob("*.db"))
    # Upgrade keeps the operator's config and the models they added, replaces bundled files, and
    # updates a console installed earlier.
    (stage / "etc/systemd/system/edge-console.service").write_text("[Unit]\n# stale\n")
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    own = prefix / "src/models/my-model"
    own.mkdir()
    (own / "model.toml").write_text("# the operator's own model\n")
    (prefix / "src/models/efficientnet-lite0/labels.txt").write_text("stale\n")
    done = subprocess.run(script, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0 and "kept existing" in done.stdout
    assert "edited by the operator" in config.read_text()
    assert (own / "model.toml").read_text() == "# the operator's own model\n", done.stdout
    assert "kept model my-model" in done.stdout
    assert (prefix / "src/models/efficientnet-lite0/labels.txt").read_text().startswith("tench"), (
        "bundled replaced"
    )
    console_unit = (stage / "etc/systemd/system/edge-console.service").read_text()
    assert "stale" not in console_unit and "ExecStart=" in console_unit
    done = subprocess.run([*script, "--uninstall"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert not prefix.exists() and not (stage / "etc/systemd/system/edge-agent.service").exists()
    assert config.exists(), "config kept without --purge"
    subprocess.run([*script, "--uninstall", "--purge"], check=True, capture_output=True, timeout=60)
    assert not config.exists()


def test_doctor_finds_what_to_fix(broker, tmp_path):
    base = [
        sys.executable,
        "-m",
        "agent",
        "doctor",
        "--broker",
        broker.url,
        "--state-dir",
        str(tmp_path / "s"),
    ]
    ok = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout
    assert "ready to serve" in ok.stdout and "MQTT 5 connect accepted" in ok.stdout
    assert "[ok  ] JPEG decoder: libjpeg-turbo via simplejpeg" in ok.stdout
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "efficientnet-lite0", models / "efficientnet-lite0")
    onnx = models / "efficientnet-lite0" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"tampered!!")
    bad = subprocess.run(
        [
            *base[:-2],
            "--broker",
            f"mqtt://127.0.0.1:{free_port()}",
            "--models",
            str(models),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "[FAIL] model efficientnet-lite0" in bad.stdout and "sha256" in bad.stdout
    assert "[FAIL] broker" in bad.stdout and "fix:" in bad.stdout


@pytest.mark.slow  # a second full install staging; the first (default set) covers the script's path
def test_install_keeps_a_gpu_devices_own_onnxruntime(tmp_path):
    """A venv that already holds a platform build of ONNX Runtime (onnxruntime-gpu on a Jetson) keeps
    it: the CPU `onnxruntime`, same module, other files, must not be installed over it."""
    stage = tmp_path / "root"
    venv_dir = stage / "opt/edge-agent/venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True, timeout=120)
    site = next((venv_dir / "lib").glob("python3*/site-packages"))
    # The platform's build, as its wheel would register itself (the files themselves do not matter).
    meta = site / "onnxruntime_gpu-1.20.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.0\n")
    (meta / "RECORD").write_text("")
    env = {**os.environ, "PIP_ARGS": "--no-deps", "EXTRAS": ""}
    done = subprocess.run(
        ["bash", str(UNITS / "install.sh"), "--root", str(stage)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kept this device's own ONNX Runtime (onnxruntime-gpu)" in done.stdout
    installed = subprocess.run(
        [str(venv_dir / "bin/python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert "onnxruntime" not in names and "onnxruntime-gpu" in names, names
    # Every other core dependency is there, at the pinned version.
    assert {"edge-agent", "numpy", "pydantic", "paho-mqtt", "sqlite-utils"} <= names, names
    pins = dict(
        line.split("==")
        for line in (REPO / "deploy/constraints.txt").read_text().splitlines()
        if "==" in line and ";" not in line
    )
    versions = dict(line.split("==") for line in installed.splitlines() if "==" in line)
    assert versions["pydantic"] == pins["pydantic"]

"""Shared fixtures: a real Mosquitto on a free loopback port, a real agent process, MQTT helpers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.devtools.local_broker import LocalBroker

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "agent" / "samples"
MODELS = REPO / "models"
# ImageNet classes 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat).
CAT_CLASSES = set(range(281, 286))
ESPRESSO = 967


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as b:
        yield b


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A private PostgreSQL server for the whole test session (tests/pg.py); skipped without one."""
    from tests.pg import postgres_server

    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The console's database, once per store: a SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "console.db")
    server = request.getfixturevalue("postgres")
    return str(server.fresh_database())


class Collector:
    """A paho MQTT 5 subscriber that keeps every message it gets, for assertions."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        username: str | None = None,
        password: str | None = None,
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.topics = topics
        self.subscribed = 0
        # Subscribe on every connect: paho reconnects by itself, and a restarted broker forgot us.
        self.client.on_connect = lambda c, *_: [c.subscribe(t, qos=1) for t in self.topics]
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(**tls)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while self.subscribed < len(topics) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _on_subscribe(self, *_: Any) -> None:
        with self._cond:
            self.subscribed += 1
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def json(self, topic: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(m.payload) for m in self.messages if topic is None or m.topic == topic]

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], topic: str, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [json.loads(m.payload) for m in self.messages if m.topic == topic and m.payload]
                if predicate(got):
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting on {topic}; got {got[-5:]}")
                self._cond.wait(remaining)

    def publish(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        self.client.publish(topic, payload, qos=1, **kwargs).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def collector(broker: LocalBroker) -> Iterator[Callable[[list[str]], Collector]]:
    made: list[Collector] = []

    def make(topics: list[str]) -> Collector:
        c = Collector(broker.port, topics)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


class AgentProcess:
    """The real `edge-agent run` as a subprocess, as systemd would run it."""

    running: ClassVar[set[AgentProcess]] = set()  # stopped after each test, whatever it asserted

    def __init__(
        self,
        broker: LocalBroker,
        state_dir: Path,
        device_id: str,
        config: str = "",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.broker = broker
        self.state_dir = state_dir
        self.device_id = device_id
        self.config_path = state_dir / "agent.toml"
        self.config_path.write_text(config)
        self.log_path = state_dir / "agent.log"
        self.cwd = cwd
        self.args = [
            *(command or [sys.executable, "-m", "agent"]),
            "run",
            "--config",
            str(self.config_path),
            "--broker",
            broker.url,
            "--device-id",
            device_id,
            "--state-dir",
            str(state_dir),
            *(extra_args or []),
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
        )
        AgentProcess.running.add(self)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for a retained status with online=true and every tenant ready."""
        c = Collector(self.broker.port, [f"edge/{self.device_id}/status"])
        try:

            def ready(msgs: list[dict[str, Any]]) -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
                if not msgs or not msgs[-1].get("online"):
                    return False
                tenants = msgs[-1]["placement"]["tenants"]
                return bool(tenants) and all(t["state"] == "ready" for t in tenants)

            return c.wait_for(ready, f"edge/{self.device_id}/status", timeout)[-1]
        finally:
            c.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        AgentProcess.running.discard(self)
        return self.proc.returncode


@pytest.fixture(autouse=True)
def _no_agent_outlives_its_test() -> Iterator[None]:
    """A test that fails between start() and stop() must not leave an agent running."""
    yield
    for agent in list(AgentProcess.running):
        agent.stop(signal.SIGKILL, timeout=10)


@pytest.fixture
def agent_factory(broker: LocalBroker, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    made: list[AgentProcess] = []

    def make(device_id: str = "dev1", config: str = "", **kwargs: Any) -> AgentProcess:
        state = tmp_path / f"state-{device_id}-{len(made)}"
        state.mkdir()
        agent = AgentProcess(broker, state, device_id, config, **kwargs)
        made.append(agent)
        return agent

    yield make
    for a in made:
        a.stop()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder Mosquitto can read after dropping to its own user (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="edge-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def passwd_file(folder: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (rewritten whole; SIGHUP makes the broker re-read it)."""
    path = folder / "passwd"
    path.unlink(missing_ok=True)
    for user, password in users.items():
        subprocess.run(
            ["mosquitto_passwd", "-b", *([] if path.exists() else ["-c"]), str(path), user, password],
            check=True,
            capture_output=True,
        )
    path.chmod(0o644)
    return path


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def wait_for_log(agent: AgentProcess, needle: str, count: int = 1, timeout: float = 60.0) -> str:
    """Wait until the agent's log holds `needle` at least `count` times (the log file is appended to
    across restarts: pass the count expected after this start). Fails if the agent exits first."""
    deadline = time.monotonic() + timeout
    while True:
        text = agent.log()
        if text.count(needle) >= count:
            return text
        if agent.proc is not None and agent.proc.poll() is not None:
            raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {count}x {needle!r} in the agent's log after {timeout:g} s:\n{text[-3000:]}"
            )
        time.sleep(0.05)  # polls the log file for the line (the event), bounded by the deadline

"""A broker that refuses: client commands say so at once, the agent names the topic, and no command
prints the broker password (the real `edge-agent` commands against a real Mosquitto with an ACL)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.devtools.local_broker import LocalBroker, free_port
from tests.conftest import SAMPLES, AgentProcess, passwd_file, wait_for_log

CLIENT_PW = "cam-01-Secr3t-pw"
# The command-line user may read the fleet and use its own reply topics, not send frames; the agent
# may publish its status, not its telemetry.
ACL = """user cam-01
topic readwrite edge-client/#
topic read edge/#

user agent
topic read edge/#
topic readwrite edge/acl1/status
"""


@pytest.fixture
def acl_broker(shared_dir: Path):
    pw = passwd_file(shared_dir, {"cam-01": CLIENT_PW, "agent": "agent-pw"})
    acl = shared_dir / "acl"
    acl.write_text(ACL)
    acl.chmod(0o644)
    with LocalBroker(anonymous=False, extra_config=f"password_file {pw}\nacl_file {acl}\n") as broker:
        yield broker


def _config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "cam-01"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
        f'username = "cam-01"\npassword = "{CLIENT_PW}"\n'
    )
    return path


def _edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=120)


def test_infer_refused_by_the_acl_fails_at_once_naming_the_topic(acl_broker, tmp_path):
    """Not "no answer (is the agent running?)" after the timeout: the broker's answer, at once."""
    config = _config(tmp_path, acl_broker.port)
    done = _edge_agent("infer", "--config", str(config), "--timeout", "20", str(SAMPLES / "daisy.jpg"))
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "edge/cam-01/infer" in out and "Not authorized" in out, out
    assert "no answer" not in out, out
    assert CLIENT_PW not in out


def test_camera_refused_by_the_acl_stops_at_once_naming_the_topic(acl_broker, tmp_path):
    """Not a reconnect loop that retries a frame the broker will refuse again."""
    config = _config(tmp_path, acl_broker.port)
    done = _edge_agent(
        "camera", "--config", str(config), "--frames", "3", "--timeout", "20", str(SAMPLES / "daisy.jpg")
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "refused the publish to edge/cam-01/infer: Not authorized" in out, out
    assert "broker connection lost" not in out, out
    assert CLIENT_PW not in out


def test_place_refused_by_the_acl_names_the_placement_topic(acl_broker, tmp_path):
    config = _config(tmp_path, acl_broker.port)
    done = _edge_agent("place", "--config", str(config), "--model", "mobilenet_v2", "--timeout", "20")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "refused the publish to edge/cam-01/placement: Not authorized" in out, out
    assert CLIENT_PW not in out


def test_failing_commands_never_print_the_broker_password(acl_broker, tmp_path):
    """status with no agent, infer against a broker that is down (from the config, and from a
    --broker URL with credentials): each fails, and its output holds no password."""
    config = _config(tmp_path, acl_broker.port)
    down = tmp_path / "down"
    down.mkdir()
    down_config = _config(down, free_port())
    runs = [
        _edge_agent("status", "--config", str(config), "--timeout", "1"),
        _edge_agent("infer", "--config", str(down_config), str(SAMPLES / "daisy.jpg")),
        _edge_agent(
            "status",
            "--config",
            str(down_config),
            "--broker",
            f"mqtt://cam-01:{CLIENT_PW}@127.0.0.1:{free_port()}",
        ),
        _edge_agent("infer", "--broker", f"mqtt://cam-01:{CLIENT_PW}@127.0.0.1:0", "x.jpg"),
    ]
    for done in runs:
        out = done.stdout + done.stderr
        assert done.returncode != 0, out
        assert out.strip(), "a failing command says why"
        assert CLIENT_PW not in out, out


def test_the_agent_logs_the_topic_of_a_refused_publish(acl_broker, tmp_path):
    config = '[broker]\nusername = "agent"\npassword = "agent-pw"\n[metrics]\ntelemetry_interval_s = 0.5\n'
    agent = AgentProcess(acl_broker, tmp_path, "acl1", config).start()
    log = wait_for_log(agent, "broker refused a publish to edge/acl1/telemetry: Not authorized")
    assert "agent-pw" not in log
    assert agent.stop() == 0

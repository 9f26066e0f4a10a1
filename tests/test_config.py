"""Configuration: file < environment < flags, and one clear message with exit code 2 when wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from agent.service.config import ConfigError, load_config, parse_broker_url
from agent.service.daemon import apply_cpu_policy


def test_precedence_file_env_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'device_id = "from-file"\n[broker]\nhost = "file-host"\nport = 1111\nusername = "u"\npassword = "p"\n'
        "[scheduler]\nqueue_depth = 7\n"
    )
    c = load_config(cfg)
    assert (c.device_id, c.broker.host, c.broker.port, c.scheduler.queue_depth) == (
        "from-file",
        "file-host",
        1111,
        7,
    )
    monkeypatch.setenv("EDGE_AGENT_DEVICE_ID", "from-env")
    monkeypatch.setenv("EDGE_AGENT_SCHEDULER__QUEUE_DEPTH", "9")
    c = load_config(cfg)
    assert (c.device_id, c.scheduler.queue_depth) == ("from-env", 9)
    c = load_config(cfg, overrides={"device_id": "from-flag"}, broker_url="mqtt://10.0.0.5:1999")
    assert (c.device_id, c.broker.host, c.broker.port) == ("from-flag", "10.0.0.5", 1999)
    assert (c.broker.username, c.broker.password) == ("u", "p"), "flags keep the file's credentials"


def test_defaults_device_id_is_hostname_and_default_placement():
    c = load_config(None)
    assert c.device_id
    assert c.placement.tenants[0].model == "efficientnet-lite0"
    assert c.ingest.max_payload_bytes == 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://h:1", {"host": "h", "port": 1, "tls": {"enabled": False}}),
        ("h", {"host": "h", "port": 1883, "tls": {"enabled": False}}),
        ("mqtts://h", {"host": "h", "port": 8883, "tls": {"enabled": True}}),
        (
            "mqtt://user:pw@h:2",
            {"host": "h", "port": 2, "tls": {"enabled": False}, "username": "user", "password": "pw"},
        ),
    ],
)
def test_broker_urls(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://:1", "mqtt://h:99999", "mqtt://h:0"])
def test_bad_broker_urls(url):
    with pytest.raises(ConfigError):
        parse_broker_url(url)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[broker]\nport = 'many'\n", "broker.port"),
        ("no_such_option = 1\n", "no_such_option"),
        ('device_id = "bad id with spaces"\n', "device_id"),
        ("[placement]\ngeneration = 1\n[[placement.tenants]]\nmodel = '../../etc/passwd'\n", "model"),
        ("this is [ not toml", "config file"),
        ("[scheduler]\ncpu_policy = 'fifo'\n", "scheduler.cpu_policy"),
    ],
)
def test_bad_config_is_one_clear_message_and_exit_2(tmp_path, text, needle):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg), "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_config_file_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "does not exist" in done.stderr


def test_a_plain_broker_url_turns_off_the_config_files_tls(tmp_path):
    """`edge-agent status --broker mqtt://localhost:1883` on a device whose agent.toml enables TLS."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[broker]\nhost = "b"\nusername = "u"\n[broker.tls]\nenabled = true\nca_file = "/ca.pem"\n'
    )
    plain = load_config(cfg, broker_url="mqtt://127.0.0.1:1884")
    assert (plain.broker.host, plain.broker.port, plain.broker.tls.enabled) == ("127.0.0.1", 1884, False)
    assert plain.broker.username == "u" and str(plain.broker.tls.ca_file) == "/ca.pem"
    assert load_config(cfg, broker_url="mqtts://127.0.0.1").broker.tls.enabled


@pytest.mark.parametrize("value", ['""', '"   "', '["", "x"]'])
def test_an_empty_placement_key_is_a_config_error_not_unsigned_accepted(tmp_path, value):
    """A template or an unset variable leaving the key empty must not switch signatures off."""
    path = tmp_path / "agent.toml"
    path.write_text(f"[security]\nplacement_public_key = {value}\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(path)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies only")
@pytest.mark.parametrize(("policy", "expected"), [("batch", "SCHED_BATCH"), ("normal", "SCHED_OTHER")])
def test_cpu_policy_applies_to_the_thread_and_the_threads_it_starts(policy, expected):
    """scheduler.cpu_policy is set before the agent starts its threads: they all inherit it (the
    runtimes' own threads too). Tried on a thread of its own, not on the test process."""
    seen: list[int] = []

    def agent_main() -> None:
        apply_cpu_policy(policy)
        seen.append(os.sched_getscheduler(0))
        child = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
        child.start()
        child.join()

    thread = threading.Thread(target=agent_main)
    thread.start()
    thread.join()
    assert seen == [getattr(os, expected)] * 2

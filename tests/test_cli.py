"""The CLI a user reaches for: infer, status, backends, demo."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAMPLES

pytestmark = pytest.mark.timeout(240)


def edge_agent(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout
    )


def test_infer_and_status(agent_factory, broker):
    agent = agent_factory("cli1").start()
    agent.wait_ready()
    done = edge_agent(
        "infer",
        str(SAMPLES / "espresso.jpg"),
        str(SAMPLES / "daisy.jpg"),
        "--broker",
        broker.url,
        "--device-id",
        "cli1",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "espresso" in lines[0].split()[1]
    assert "daisy" in lines[1].split()[1]
    done = edge_agent(
        "infer", str(SAMPLES / "cat.jpg"), "--json", "--broker", broker.url, "--device-id", "cli1"
    )
    assert json.loads(done.stdout)["model"] == "efficientnet-lite0"
    done = edge_agent("status", "--broker", broker.url, "--device-id", "cli1")
    assert done.returncode == 0
    status = json.loads(done.stdout)
    assert status["online"] and status["placement"]["tenants"][0]["state"] == "ready"


def test_infer_reports_errors_with_exit_1(agent_factory, broker, tmp_path):
    agent = agent_factory("cli2").start()
    agent.wait_ready()
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not really a jpeg")
    done = edge_agent("infer", str(junk), "--broker", broker.url, "--device-id", "cli2")
    assert done.returncode == 1
    assert "bad_image" in done.stdout


def test_infer_without_agent_times_out_clearly(broker):
    done = edge_agent(
        "infer", str(SAMPLES / "cat.jpg"), "--timeout", "1", "--broker", broker.url, "--device-id", "nobody"
    )
    assert done.returncode == 1
    assert "no answer" in done.stdout


def test_backends_lists_runtimes():
    done = edge_agent("backends")
    assert done.returncode == 0
    assert "onnxruntime" in done.stdout and "available" in done.stdout


def test_demo_shows_correct_labels():
    done = edge_agent("demo", timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {
        line.split()[0]: line.split()[1]
        for line in done.stdout.splitlines()
        if line.endswith(")") and line.split()[0].endswith(".jpg")
    }
    assert rows["espresso.jpg"] == "espresso"
    assert rows["daisy.jpg"] == "daisy"
    # The detector beside the classifier: the woman and her dog in the photo from agent/samples/detection.
    found = re.findall(r"^  (\w+) +(0\.\d{3})  x ", done.stdout, re.M)
    assert {"person", "dog"} <= {label for label, _ in found}, done.stdout
    assert "agent, console and broker stopped" in done.stdout
    assert "* console: http://127.0.0.1:" in done.stdout and "login admin /" in done.stdout
    # ...and they are: no process of the demo outlives it.
    pids = [int(m) for m in re.findall(r"\(pid (\d+)", done.stdout)]
    assert len(pids) == 2, done.stdout  # the agent and the console
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_keygen_writes_a_key_pair_the_agent_accepts(agent_factory, broker, tmp_path):
    """`edge-agent keygen`, then `edge-agent place --sign-key` with the key it wrote: an agent holding
    the printed public key applies that placement, and refuses one signed with any other key."""
    from agent.protocol.signing import (
        SignatureRefused,
        generate_keypair,
        load_private_key,
        load_public_key,
        sign,
        verify,
    )

    done = edge_agent("keygen", "--out", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    private = tmp_path / "keys" / "placement-signing.key"
    public = done.stdout.split("placement_public_key): ")[1].strip()
    assert (tmp_path / "keys" / "placement-signing.pub").read_text().strip() == public
    (tmp_path / "other").mkdir()
    other = generate_keypair(tmp_path / "other")[0]
    # The two halves belong together: what the private key signs verifies with the printed public key.
    doc = {
        "generation": 2,
        "tenants": [{"model": "efficientnet-lite0", "backend": "openvino", "device": "CPU"}],
    }
    verify(sign(doc, load_private_key(private)), load_public_key(public), max_age_s=3600)
    with pytest.raises(SignatureRefused, match="forged"):
        verify(sign(doc, load_private_key(other)), load_public_key(public), max_age_s=3600)
    # The real agent, configured with that public key, obeys the CLI's signed placements only.
    agent = agent_factory("key1", config=f'[security]\nplacement_public_key = "{public}"\n').start()
    agent.wait_ready()
    place = ["place", "--broker", broker.url, "--device-id", "key1", "--model", "efficientnet-lite0"]
    place += ["--backend", "openvino", "--device", "CPU", "--timeout", "60"]
    forged = edge_agent(*place, "--generation", "2", "--sign-key", str(other))
    assert forged.returncode == 1, forged.stdout + forged.stderr
    assert "refused: signature: forged" in forged.stdout, forged.stdout
    placed = edge_agent(*place, "--generation", "3", "--sign-key", str(private))
    assert placed.returncode == 0, placed.stdout + placed.stderr
    assert "applied generation 3" in placed.stdout
    status = agent.wait_ready()
    assert status["placement"]["applied_generation"] == 3
    assert [(t["backend"], t["state"]) for t in status["placement"]["tenants"]] == [("openvino", "ready")]


def test_client_commands_without_a_broker_say_so_in_one_line(tmp_path):
    from agent.devtools.local_broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens there
    for args in (
        ["status"],
        ["infer", str(SAMPLES / "cat.jpg")],
        ["place", "--model", "efficientnet-lite0", "--timeout", "2"],
    ):
        done = edge_agent(*args, "--broker", url, "--device-id", "x", timeout=60)
        assert done.returncode == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert f"cannot talk to the broker at {url}" in done.stderr


@pytest.mark.parametrize("problem", ["state_dir_is_a_file", "no_models_dir"])
def test_unusable_folders_are_config_errors(tmp_path, problem):
    afile = tmp_path / "afile"
    afile.write_text("")
    args = ["run", "--broker", "mqtt://127.0.0.1:1", "--device-id", "d"]
    if problem == "state_dir_is_a_file":
        args += ["--state-dir", str(afile / "sub")]
        needle = "state_dir"
    else:
        args += ["--state-dir", str(tmp_path / "state"), "--models", str(tmp_path / "nomodels")]
        needle = "models_dir"
    done = edge_agent(*args, timeout=60)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr

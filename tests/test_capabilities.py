"""Runtimes are probed in a child process: one that crashes is reported, and the agent serves on."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import sample

CRASHING_TFLITE = """
import os, signal
import backends.tflite_backend as tflite

def crash(self):
    os.kill(os.getpid(), signal.SIGSEGV)  # what a mismatched delegate library does

tflite.TfliteBackend.available = crash
"""


def test_a_runtime_that_crashes_while_probed_is_unavailable_and_the_agent_serves(
    agent_factory, collector, tmp_path: Path
):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHING_TFLITE)  # loaded by the agent and its children
    agent = agent_factory("crash1", env={"PYTHONPATH": str(hook)}).start()
    status = agent.wait_ready()
    backends = status["capabilities"]["backends"]
    assert backends["tflite"]["available"] is False
    assert "crashed while probing (SIGSEGV)" in backends["tflite"]["reason"]
    assert backends["onnxruntime"]["available"] is True and backends["onnxruntime"]["devices"] == ["cpu"]
    assert backends["openvino"]["available"] is True, "the other runtimes were probed alone"
    c = collector(["edge/crash1/result"])
    c.publish("edge/crash1/infer", sample("espresso.jpg"))
    (result,) = c.wait_for(lambda r: len(r) >= 1, "edge/crash1/result")
    assert result["top"][0]["label"] == "espresso"
    assert "probing each alone" in agent.log()


CRASHING_TFLITE_LOAD = """
import os, signal
import backends.tflite_backend as tflite

def crash(self, model, device, options):
    os.kill(os.getpid(), signal.SIGSEGV)  # what a mismatched delegate does while a model loads

tflite.TfliteBackend.load = crash
"""


def test_a_runtime_that_crashes_while_loading_fails_its_tenant_and_the_agent_serves(
    agent_factory, collector, tmp_path: Path
):
    """A crash-prone runtime loads each model in a child first (backends/isolation.py): the crash
    fails that tenant with the reason, and the agent, with its other tenant, serves on."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASHING_TFLITE_LOAD)  # in the agent and its children
    config = """
[placement]
generation = 1
[[placement.tenants]]
model = "efficientnet-lite0"
backend = "onnxruntime"
[[placement.tenants]]
model = "efficientnet-lite1"
backend = "tflite"
"""
    agent = agent_factory(
        "crash2", config=config, env={"PYTHONPATH": str(hook), "EDGE_AGENT_ISOLATE_LOADS": "tflite"}
    ).start()
    c = collector(["edge/crash2/status", "edge/crash2/result"])

    def settled(statuses: list[dict]) -> bool:
        tenants = (statuses[-1].get("placement") or {}).get("tenants", []) if statuses else []
        return len(tenants) == 2 and all(t["state"] in ("ready", "failed") for t in tenants)

    status = c.wait_for(settled, "edge/crash2/status", timeout=120)[-1]
    by_backend = {t["backend"]: t for t in status["placement"]["tenants"]}
    assert by_backend["onnxruntime"]["state"] == "ready"
    assert by_backend["tflite"]["state"] == "failed"
    assert "crashed while loading" in by_backend["tflite"]["error"], by_backend["tflite"]
    assert "SIGSEGV" in by_backend["tflite"]["error"]
    c.publish("edge/crash2/infer", sample("espresso.jpg"))
    (result,) = c.wait_for(lambda r: len(r) >= 1, "edge/crash2/result")
    assert result["top"][0]["label"] == "espresso"
    assert agent.proc is not None and agent.proc.poll() is None, "the agent is still running"


def test_a_restart_reuses_the_probe_while_libraries_and_devices_are_the_same(agent_factory, tmp_path: Path):
    """The probe's answer is kept in the state dir with a fingerprint of the runtime libraries and
    device nodes; a restart with the same fingerprint needs no probe child, one with another does."""
    agent = agent_factory("cache1").start()
    first = agent.wait_ready()["capabilities"]["backends"]
    cache = agent.state_dir / "capabilities.json"
    assert json.loads(cache.read_text())["backends"] == first
    assert agent.stop() == 0
    agent.start()
    again = agent.wait_ready()["capabilities"]["backends"]
    assert again == first
    assert agent.log().count("runtimes as probed before") == 1
    # Another library version or device (here: a fingerprint from another install) probes again.
    assert agent.stop() == 0
    saved = json.loads(cache.read_text())
    cache.write_text(json.dumps({**saved, "fingerprint": "another-install"}))
    agent.start()
    assert agent.wait_ready()["capabilities"]["backends"] == first
    assert agent.log().count("runtimes as probed before") == 1, "probed afresh"
    assert json.loads(cache.read_text())["fingerprint"] == saved["fingerprint"]

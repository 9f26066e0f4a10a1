"""Runtimes are probed in a child process: one that crashes is reported, and the agent serves on."""

from __future__ import annotations

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

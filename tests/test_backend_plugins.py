"""A backend from another package: installed with its own entry point, served by the real agent.

The package is built here as a real distribution on disk (a module and its `.dist-info` with an
`edge_agent.backends` entry point), put on the agent's path, and nothing of edge-agent changes: the
agent finds the backend, reports it in its status, and serves the bundled model on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import sample

PLUGIN = '''
"""An ONNX Runtime on the CPU, shipped by someone else under its own backend name."""

from backends.base import Backend, BackendInfo, InferenceError, module_present


class PluginSession:
    def __init__(self, session):
        self._session = session
        self._input = session.get_inputs()[0].name

    def infer(self, batch):
        try:
            return self._session.run(None, {self._input: batch})[0]
        except Exception as exc:
            raise InferenceError(f"plugincpu: {exc}") from exc

    def close(self):
        self._session = None


class PluginBackend(Backend):
    name = "plugincpu"
    formats = ("onnx",)
    info = BackendInfo(
        devices=("cpu",),
        packages=("edge-agent-plugin-demo",),
        install="pip install edge-agent-plugin-demo",
    )

    def available(self):
        return (True, "") if module_present("onnxruntime") else (False, "needs onnxruntime")

    def devices(self):
        return ["cpu"] if self.available()[0] else []

    def load(self, model, device, options):
        import onnxruntime as ort

        self.canonical_device(device)
        path = self.artifact(model)
        return PluginSession(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
'''


def install_plugin(site: Path) -> Path:
    """The distribution `edge-agent-plugin-demo` as pip would leave it in site-packages."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "edge_agent_plugin_demo.py").write_text(PLUGIN)
    meta = site / "edge_agent_plugin_demo-0.1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-agent-plugin-demo\nVersion: 0.1.0\n")
    (meta / "entry_points.txt").write_text(
        "[edge_agent.backends]\nplugincpu = edge_agent_plugin_demo:PluginBackend\n"
    )
    (meta / "RECORD").write_text("")
    return site


def test_a_backend_installed_by_another_package_serves_through_the_real_agent(
    agent_factory, collector, tmp_path: Path
):
    site = install_plugin(tmp_path / "site")
    config = textwrap.dedent(
        """
        [placement]
        generation = 1
        [[placement.tenants]]
        model = "efficientnet-lite0"
        backend = "plugincpu"
        device = "cpu"
        """
    )
    agent = agent_factory("plug1", config, env={"PYTHONPATH": str(site)}).start()
    status = agent.wait_ready()
    assert status["capabilities"]["backends"]["plugincpu"] == {
        "available": True,
        "devices": ["cpu"],
        "reason": "",
    }
    (tenant,) = status["placement"]["tenants"]
    assert (tenant["backend"], tenant["device"], tenant["state"]) == ("plugincpu", "cpu", "ready")
    c = collector(["edge/plug1/result"])
    c.publish("edge/plug1/infer", sample("espresso.jpg"))
    (result,) = c.wait_for(lambda r: len(r) >= 1, "edge/plug1/result")
    assert result["tenant"]["backend"] == "plugincpu"
    assert result["top"][0]["label"] == "espresso"


def test_an_installed_backend_is_listed_by_the_cli_and_a_broken_one_is_only_unavailable(tmp_path: Path):
    site = install_plugin(tmp_path / "site")
    broken = site / "edge_agent_broken-0.1.0.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-agent-broken\nVersion: 0.1.0\n")
    (broken / "entry_points.txt").write_text("[edge_agent.backends]\nbroken = no_such_module:Nothing\n")
    done = subprocess.run(
        [sys.executable, "-m", "backends.probe"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["plugincpu"]["available"] is True
    assert found["broken"]["available"] is False and "no_such_module" in found["broken"]["reason"]
    assert found["onnxruntime"]["available"] is True, "the built-in runtimes are still there"

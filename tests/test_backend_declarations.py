"""Each backend declares its devices, device nodes and unit device classes once; the rest reads that."""

from __future__ import annotations

import json
import pprint
import shutil
import subprocess
import sys

from agent.placement.auto import resource_of
from agent.protocol.runtimes import BACKEND_DEVICES, device_declared
from backends import registry
from tests.conftest import REPO


def test_the_consoles_table_is_the_backends_declarations():
    """The console imports no backend: agent.protocol carries a copy, which must not drift."""
    declared = {name: info.devices for name, info in sorted(registry.declarations().items())}
    assert declared == BACKEND_DEVICES, "paste into agent/protocol/runtimes.py:\n" + pprint.pformat(declared)


def test_every_device_a_runtime_reports_here_is_one_it_declares():
    for name, (ok, devices, _reason) in registry.capabilities().items():
        if ok:
            assert all(device_declared(name, d) for d in devices), (name, devices)


def test_shared_resources_come_from_the_declarations():
    """Runtimes on the host CPU share it; ONNX Runtime's GPU providers and PyTorch share the GPU."""
    assert resource_of("openvino", "CPU") == resource_of("tflite", "cpu") == "cpu"
    assert resource_of("onnxruntime", "tensorrt:1") == resource_of("torch", "cuda:1") == "cuda:1"
    assert resource_of("tensorrt", "cuda") == "cuda:0"
    assert resource_of("openvino", "GPU") != resource_of("openvino", "GPU.1")
    assert resource_of("edgetpu", "usb:0") != resource_of("edgetpu", "usb:1")


def test_a_runtime_not_installed_names_the_extra_pinned_by_the_constraints(tmp_path):
    """`edge-agent backends` on an installed wheel: the hint is the extra, with deploy/constraints.txt,
    not an unpinned `pip install openvino` (docs/install.md)."""
    wheel_like = tmp_path / "site-packages"
    shutil.copytree(REPO / "backends", wheel_like / "backends", ignore=shutil.ignore_patterns("__pycache__"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import sys\nsys.modules['openvino'] = None  # not installed\n")
    done = subprocess.run(
        [sys.executable, "-m", "backends.probe", "openvino", "onnxruntime"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": f"{hook}:{wheel_like}", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["openvino"]["reason"] == (
        "openvino is not installed (pip install -c deploy/constraints.txt 'edge-agent[openvino]')"
    )

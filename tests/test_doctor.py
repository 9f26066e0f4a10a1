"""`edge-agent doctor` checks what the agent will serve, in the models folder the agent will use."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from agent.protocol.schemas import Placement, TenantSpec
from tests.conftest import MODELS

CONFIG = """
[placement]
generation = 1
[[placement.tenants]]
model = "efficientnet-lite0"
backend = "{backend}"
device = "{device}"
"""


def doctor(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "doctor",
            "--no-broker",
            "--state-dir",
            str(tmp_path / "state"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def save_placement(tmp_path: Path, backend: str, device: str) -> None:
    """What the reconciler leaves in the state dir once it applied a placement (agent/placement/store.py)."""
    (tmp_path / "state").mkdir(exist_ok=True)
    placement = Placement(
        generation=7, tenants=[TenantSpec(model="efficientnet-lite0", backend=backend, device=device)]
    )
    (tmp_path / "state" / "placement.json").write_text(placement.model_dump_json(indent=2))


def test_doctor_checks_the_saved_placement_the_agent_will_serve(tmp_path: Path):
    """A placement received over MQTT replaces the config's at the next start: that is the one to check."""
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG.format(backend="onnxruntime", device="cpu"))
    save_placement(tmp_path, "tensorrt", "cuda:0")  # not on this machine
    bad = doctor(tmp_path, "--config", str(config))
    assert bad.returncode == 1, bad.stdout
    assert "[FAIL] placement efficientnet-lite0: backend tensorrt" in bad.stdout
    assert "saved placement" in bad.stdout

    config.write_text(CONFIG.format(backend="tensorrt", device="cuda:0"))
    save_placement(tmp_path, "onnxruntime", "CPU")
    good = doctor(tmp_path, "--config", str(config))
    assert good.returncode == 0, good.stdout
    assert "[FAIL]" not in good.stdout


def test_doctor_on_the_bundled_models_package_does_not_take_pycache_for_a_model(tmp_path: Path):
    """An installed wheel's models folder is a Python package (`__init__.py`, `__pycache__`)."""
    models = tmp_path / "models"
    shutil.copytree(MODELS / "efficientnet-lite0", models / "efficientnet-lite0")
    (models / "__init__.py").write_text("")
    (models / "__pycache__").mkdir()
    (models / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\x00")
    (models / "My-Model").mkdir()  # a real mistake: upper case is not a model name
    done = doctor(tmp_path, "--models", str(models))
    assert done.returncode == 0, done.stdout
    assert "__pycache__" not in done.stdout
    assert "[WARN] folder My-Model: not a valid model name" in done.stdout

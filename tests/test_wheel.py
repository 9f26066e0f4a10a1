"""The installed-wheel path a fleet uses: build the wheel, install it in a fresh venv outside the
checkout with the fleet's pinned versions, and serve a real photo with the bundled model.

This is what breaks when models/ or package data are left out of the wheel, or when a core
dependency goes missing (an editable checkout hides both)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.devtools.local_broker import LocalBroker
from tests.conftest import CAT_CLASSES, REPO, AgentProcess, Collector, sample

CONSTRAINTS = REPO / "deploy" / "constraints.txt"


def _run(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=_clean_env())
    assert done.returncode == 0, (
        f"{args} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    )
    return done.stdout


def _clean_env() -> dict[str, str]:
    """No trace of the checkout or of the test venv: the installed package must stand alone."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv holding only the wheel and its core dependencies (pinned by the constraints)."""
    work = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", work / "dist", REPO, cwd=work)
    (wheel,) = (work / "dist").glob("edge_agent-*.whl")
    venv.EnvBuilder(with_pip=True).create(work / "venv")
    _run(work / "venv/bin/python", "-m", "pip", "install", "-q", "-c", CONSTRAINTS, wheel, cwd=work)
    yield work


def test_core_install_has_no_console_stack(installed: Path) -> None:
    python = installed / "venv/bin/python"
    found = _run(
        python,
        "-c",
        "import importlib.util as u; print([m for m in ('fastapi', 'uvicorn') if u.find_spec(m)])",
        cwd=installed,
    )
    assert found.strip() == "[]"
    console = subprocess.run([installed / "venv/bin/edge-console", "serve"], capture_output=True, text=True)
    assert console.returncode == 2 and "pip install 'edge-agent[console]'" in console.stderr, console
    where = _run(
        python, "-c", "from agent.service.config import bundled_models_dir as b; print(b())", cwd=installed
    )
    assert "site-packages" in where and REPO.as_posix() not in where
    listed = _run(installed / "venv/bin/edge-agent", "models", "--json", cwd=installed)
    models = {m["name"]: m for m in json.loads(listed)}
    assert models["efficientnet-lite0"]["verified"] is True, models


def test_installed_agent_answers_a_photo(installed: Path, tmp_path: Path) -> None:
    with LocalBroker() as broker:
        state = tmp_path / "state"
        state.mkdir()
        agent = AgentProcess(
            broker,
            state,
            "wheel-dev",
            command=[str(installed / "venv/bin/edge-agent")],
            env=_clean_env(),
            cwd=tmp_path,  # not the checkout: nothing may be found relative to it
        ).start()
        try:
            status = agent.wait_ready(timeout=120)
            assert status["placement"]["tenants"][0]["model"] == "efficientnet-lite0"
            results = Collector(broker.port, ["edge/wheel-dev/result"])
            envelope = {"request_id": "wheel-1", "image_b64": base64.b64encode(sample("cat.jpg")).decode()}
            results.publish("edge/wheel-dev/infer", json.dumps(envelope).encode())
            (answer,) = results.wait_for(bool, "edge/wheel-dev/result", timeout=60)
            results.close()
        finally:
            agent.stop()
    assert answer["request_id"] == "wheel-1"
    assert answer["top"][0]["index"] in CAT_CLASSES, answer


def test_console_extra_adds_the_console(installed: Path) -> None:
    (wheel,) = (installed / "dist").glob("edge_agent-*.whl")
    python = installed / "venv/bin/python"
    _run(python, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, f"{wheel}[console]", cwd=installed)
    out = _run(installed / "venv/bin/edge-console", "--help", cwd=installed)
    assert "serve" in out

"""The import rules of `make lint` ([tool.importlinter] in pyproject.toml) hold, and catch a break."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def agent_modules_besides_protocol() -> set[str]:
    """Every module and package directly under agent/, except agent.protocol (and __main__)."""
    out = set()
    for path in (ROOT / "agent").iterdir():
        if path.name.startswith(("_", ".")) or path.name in ("protocol", "samples"):
            continue
        if path.suffix == ".py" or (path / "__init__.py").exists():
            out.add(f"agent.{path.stem}")
    return out


def test_contracts_name_every_agent_package():
    """A package added to agent/ must be forbidden to the console and the protocol package too."""
    forbidden = set(contracts()["console-protocol-only"]["forbidden_modules"])
    missing = agent_modules_besides_protocol() - forbidden
    assert not missing, f"add {sorted(missing)} to the console-protocol-only contract in pyproject.toml"


def test_no_agent_module_is_over_500_lines():
    """A module that grows past 500 lines is doing more than one job: split it by job."""
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / "agent").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, f"split these by job: {long}"


def test_agent_cli_loads_no_benchmark_code():
    code = (
        "import sys, agent.commands.cli; agent.commands.cli.build_parser(); "
        "print(','.join(m for m in sys.modules if m == 'bench' or m.startswith('bench.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == ""


def test_daemon_loads_only_what_it_serves_with():
    """Idle memory (docs/performance.md#memory): the daemon imports no runtime (probed in a child,
    loaded per tenant), no web stack, and no cryptography unless signed placements are required."""
    heavy = (
        "onnxruntime",
        "openvino",
        "torch",
        "ai_edge_litert",
        "tensorrt",
        "fastapi",
        "uvicorn",
        "cryptography",
        "bench",
    )
    code = (
        "import sys, agent.service.daemon, agent.commands.cli; "
        f"print(','.join(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == ""


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path):
    """A copy of the packages and pyproject.toml, to break on purpose."""
    for name in ("agent", "backends", "cloud_console", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.jpg"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_rules_hold_and_a_broken_rule_fails(tree):
    assert lint_imports(tree).returncode == 0
    # The console reaching into the daemon is the break these rules exist to stop.
    console = tree / "cloud_console" / "fleet.py"
    console.write_text(console.read_text() + "\nfrom agent.frames.tenant_table import TenantTable  # noqa\n")
    done = lint_imports(tree)
    assert done.returncode != 0
    assert "cloud_console and agent.protocol import only agent.protocol of the agent BROKEN" in done.stdout
    assert "cloud_console.fleet -> agent.frames.tenant_table" in done.stdout

"""Which runtimes and devices this machine has, probed in a child process (`backends/probe.py`).

The agent process then imports only the runtimes it serves (measured: 402 MB idle RSS with one ONNX
Runtime tenant when every installed runtime was probed in-process), and a runtime that crashes while
it is imported or lists its devices is reported unavailable, with the reason, instead of taking the
agent down.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

from agent.protocol.schemas import BackendCapability
from backends import registry

log = logging.getLogger(__name__)


def _run(names: list[str], timeout_s: float) -> tuple[dict[str, BackendCapability] | None, str]:
    """One child probing `names` (all when empty): its answer, or None and why there is none."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "backends.probe", *names],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, f"the probe did not finish within {timeout_s:g} s (a device or driver may be hung)"
    if done.returncode != 0:
        if done.returncode < 0:
            why = f"the runtime crashed while probing ({signal.Signals(-done.returncode).name})"
        else:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            why = f"the probe exited with {done.returncode}: {tail[0][:200]}"
        return None, why
    try:
        raw = json.loads(done.stdout)
        return {name: BackendCapability.model_validate(cap) for name, cap in raw.items()}, ""
    except ValueError as exc:
        return None, f"the probe printed no usable answer: {exc}"


def probe_backends(timeout_s: float = 40.0, each_timeout_s: float = 20.0) -> dict[str, BackendCapability]:
    """Every backend's availability and devices. Blocking. If the probe of all fails (a crash, a
    hang), each backend is probed alone, so that only the one at fault is marked unavailable."""
    found, why = _run([], timeout_s)
    if found is not None:
        return found
    log.warning("probing the runtimes together failed (%s): probing each alone", why)
    out: dict[str, BackendCapability] = {}
    for name in registry.names():
        one, why = _run([name], each_timeout_s)
        out[name] = (one or {}).get(name) or BackendCapability(available=False, reason=why)
        if one is None:
            log.error("backend %s: %s", name, why)
    return out


def fingerprint() -> str:
    """What a probe's answer depends on: runtime library versions (as each backend declares them),
    Python, the backends installed by other packages, and the accelerator device nodes and USB ids
    present. Reading it imports no runtime (milliseconds)."""
    import glob
    import hashlib
    import importlib.metadata
    import platform

    from backends.base import usb_devices

    declared = registry.declarations()
    versions = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "numpy" or any(info.owns_package(name) for info in declared.values()):
            versions[name] = dist.version
    # A backend package's own upgrade probes afresh too.
    for point in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP):
        owner = point.dist
        versions[f"entry point {point.name}"] = (
            f"{point.value} {owner.name} {owner.version}" if owner else point.value
        )
    patterns = sorted({p for info in declared.values() for p in info.device_nodes})
    nodes = sorted(path for pattern in patterns for path in glob.glob(pattern))
    usb = sorted(str(ids) for info in declared.values() for ids in usb_devices(info.usb_ids))
    # This release's own probing code and backends: an upgrade of edge-agent probes afresh.
    code = hashlib.sha256()
    for path in sorted(Path(registry.__file__).parent.glob("*.py")):
        code.update(path.read_bytes())
    parts = [
        platform.python_version(),
        json.dumps(versions, sort_keys=True),
        code.hexdigest(),
        *nodes,
        *usb,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def probe_backends_cached(cache: Path) -> dict[str, BackendCapability]:
    """As probe_backends, but reused from `cache` while the fingerprint holds: a start then costs no
    child importing every runtime (seconds here, more on a Jetson), and a runtime that crashes while
    probed is not crashed again at every start. Answers with a timed-out probe are not kept (a hung
    device may recover)."""
    key = fingerprint()
    try:
        saved = json.loads(cache.read_text())
        if saved.get("fingerprint") == key:
            found = {n: BackendCapability.model_validate(c) for n, c in saved["backends"].items()}
            log.info("runtimes as probed before (same libraries and devices; %s)", cache)
            return found
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = probe_backends()
    if not any("did not finish" in cap.reason for cap in found.values()):
        doc = {"fingerprint": key, "backends": {n: c.model_dump() for n, c in found.items()}}
        try:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            tmp.replace(cache)
        except OSError as exc:
            log.warning("could not keep the probe's answer in %s: %s", cache, exc)
    return found

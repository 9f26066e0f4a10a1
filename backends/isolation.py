"""Loads that can crash the process are tried in a child first.

Some runtimes take the whole process down while a model loads, rather than raising: an Edge TPU
delegate built against other library versions segfaults, a TensorRT engine build can abort. In the
agent that would stop every tenant, and systemd would restart it into the same crash. A backend
marked `crash_prone` (or named in `EDGE_AGENT_ISOLATE_LOADS`, comma-separated) therefore loads each
model once in `python -m backends.isolation` first: a child that dies makes the load fail with the
reason (signal and all), and the agent serves on with its other tenants. A load that succeeded in a
child is not tried again for the same artifact and device. TensorRT's child also fills the engine
cache, so the load that follows in the agent is quick.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backends import registry
from backends.base import Backend, BackendUnavailable, ModelArtifacts, ModelLoadError, Session

ENV = "EDGE_AGENT_ISOLATE_LOADS"
TRIAL_TIMEOUT_S = 900.0  # a first TensorRT engine build on a Jetson takes minutes

_checked: set[tuple[str, str, str]] = set()
_lock = threading.Lock()


def isolated(backend: Backend) -> bool:
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    return bool(getattr(backend, "crash_prone", False)) or backend.name in names


def load(backend: Backend, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> Session:
    """`backend.load`, after a trial in a child process when the backend is one that can crash."""
    if isolated(backend):
        # Options matter too: a TensorRT engine depends on precision and the maximum batch.
        key = (
            backend.name,
            device,
            json.dumps([dict(model.sha256), dict(options)], sort_keys=True, default=str),
        )
        with _lock:
            done = key in _checked
        if not done:
            trial(backend.name, model, device, options)
            with _lock:
                _checked.add(key)
    return backend.load(model, device, options)


def trial(name: str, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> None:
    """Load (and run once) in a child; raise ModelLoadError with the reason if that fails or crashes."""
    request = {
        "backend": name,
        "device": device,
        "options": dict(options),
        "model": {**dataclasses.asdict(model), "files": {k: str(v) for k, v in model.files.items()}},
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "backends.isolation"],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=TRIAL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelLoadError(
            f"{name} did not finish loading {model.name} on {device} within {TRIAL_TIMEOUT_S:g} s "
            "(tried in a child process)"
        ) from exc
    if done.returncode < 0:
        sig = signal.Signals(-done.returncode).name
        raise BackendUnavailable(
            f"{name} crashed while loading {model.name} on {device} ({sig}; tried in a child process, "
            "the agent serves on): check that the runtime and its driver or delegate versions match"
        )
    try:
        answer = json.loads(done.stdout.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise ModelLoadError(
            f"{name} could not load {model.name} on {device} "
            f"(child exited {done.returncode}: {tail[0][:200]})"
        ) from None
    if not answer.get("ok"):
        raise ModelLoadError(str(answer.get("error") or "load failed in the child process"))


def _child() -> int:
    request = json.loads(sys.stdin.read())
    raw = request["model"]
    raw["files"] = {k: Path(v) for k, v in raw["files"].items()}
    raw["input_size"] = tuple(raw["input_size"])
    model = ModelArtifacts(**raw)
    try:
        backend = registry.get(request["backend"])
        session = backend.load(model, request["device"], request["options"])
        session.close()
        answer: dict[str, Any] = {"ok": True}
    except Exception as exc:  # reported to the parent as the load's error
        answer = {"ok": False, "error": str(exc)}
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child())

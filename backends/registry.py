"""Backends by name. The core knows runtimes only through this module; imports stay lazy."""

from __future__ import annotations

import importlib
import logging
import threading

from backends.base import Backend, BackendUnavailable

log = logging.getLogger(__name__)

# name -> "module:Class". Adding a runtime means adding its module and one line here.
BUILTIN: dict[str, str] = {
    "onnxruntime": "backends.onnxruntime_backend:OnnxRuntimeBackend",
    "openvino": "backends.openvino_backend:OpenVinoBackend",
    "tflite": "backends.tflite_backend:TfliteBackend",
    "edgetpu": "backends.edgetpu_backend:EdgeTpuBackend",
    "tensorrt": "backends.tensorrt_backend:TensorRtBackend",
    "torch": "backends.torch_backend:TorchBackend",
    "fake": "backends.fake:FakeBackend",
}
# Test doubles are not offered to users unless asked for (scheduler tests, simulators).
HIDDEN = frozenset({"fake"})

_instances: dict[str, Backend] = {}
_lock = threading.Lock()


def names(include_hidden: bool = False) -> list[str]:
    return [n for n in BUILTIN if include_hidden or n not in HIDDEN]


def get(name: str) -> Backend:
    """The backend called `name`; raises BackendUnavailable for an unknown name."""
    with _lock:
        if name in _instances:
            return _instances[name]
        target = BUILTIN.get(name)
        if target is None:
            raise BackendUnavailable(f"unknown backend {name!r} (known: {', '.join(names())})")
        module_name, cls_name = target.split(":")
        module = importlib.import_module(module_name)  # backend modules import their runtime lazily
        backend: Backend = getattr(module, cls_name)()
        _instances[name] = backend
        return backend


def capabilities_of(name: str) -> tuple[bool, list[str], str]:
    """(available, devices, reason) of one backend. Never raises."""
    try:
        backend = get(name)
        ok, reason = backend.available()
        devices = backend.devices() if ok else []
    except Exception as exc:  # a broken runtime must not take the agent down
        log.warning("backend %s probe failed: %s", name, exc)
        ok, devices, reason = False, [], f"probe failed: {exc}"
    return ok, devices, reason


def capabilities(include_hidden: bool = False) -> dict[str, tuple[bool, list[str], str]]:
    """name -> (available, devices, reason) for every registered backend. Never raises."""
    return {name: capabilities_of(name) for name in names(include_hidden)}

"""Backends by name. The core knows runtimes only through this module; imports stay lazy.

The built-in runtimes are listed below; a runtime from another package (Hailo, RKNN, ...) registers
itself in the `edge_agent.backends` entry point group of its own distribution
(`name = "module:Class"`, docs/backends.md#writing-a-backend) and needs no change here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import threading

from backends.base import Backend, BackendInfo, BackendUnavailable

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edge_agent.backends"
# name -> "module:Class". A built-in runtime is its module and one line here.
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


@functools.cache
def installed() -> dict[str, str]:
    """name -> "module:Class" of the backends other installed packages declare (read once)."""
    found: dict[str, str] = {}
    try:
        points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # broken metadata of another package must not stop the agent
        log.warning("could not read the %s entry points: %s", ENTRY_POINT_GROUP, exc)
        return found
    for point in points:
        if point.name in BUILTIN or point.name in found:
            log.warning("ignoring backend entry point %s = %s: the name is taken", point.name, point.value)
            continue
        found[point.name] = point.value
    return found


def targets() -> dict[str, str]:
    """Every backend's "module:Class": the built-in ones, then the installed ones."""
    return {**BUILTIN, **installed()}


def names(include_hidden: bool = False) -> list[str]:
    return [n for n in targets() if include_hidden or n not in HIDDEN]


def backend_class(name: str) -> type[Backend]:
    """The class of backend `name`, imported (backend modules import their runtime lazily)."""
    target = targets().get(name)
    if target is None:
        raise BackendUnavailable(f"unknown backend {name!r} (known: {', '.join(names())})")
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendUnavailable(f"backend {name!r}: {target} is not a backends.base.Backend")
    return cls


def get(name: str) -> Backend:
    """The backend called `name`; raises BackendUnavailable for an unknown name."""
    with _lock:
        if name in _instances:
            return _instances[name]
        backend = backend_class(name)()
        _instances[name] = backend
        return backend


def info(name: str) -> BackendInfo:
    """What backend `name` declares; the defaults (a CPU runtime) if it cannot be imported."""
    try:
        return backend_class(name).info
    except Exception as exc:  # an installed package that fails to import is reported by its probe
        log.debug("backend %s: no declarations (%s)", name, exc)
        return BackendInfo()


def declarations(include_hidden: bool = False) -> dict[str, BackendInfo]:
    """name -> BackendInfo of every backend. Imports backend modules, never their runtimes."""
    return {name: info(name) for name in names(include_hidden)}


def resource_of(backend: str, device: str) -> str:
    """The physical resource a backend/device runs on (backends on the host CPU share it)."""
    return info(backend).resource(backend, device)


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

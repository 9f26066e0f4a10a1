"""The backend contract every inference runtime implements.

A backend is one module with a `Backend` subclass registered by name in `backends.registry` (or in
the `edge_agent.backends` entry point group of an installed package). Its `info` declares what the
rest of the system needs to know about the runtime (devices, device nodes, shared resources, how to
install it, the systemd device classes it needs), so nothing else keeps a list of its own.
Runtimes are imported lazily inside `available()`/`load()`, so a missing runtime is reported as
unavailable with its reason and never crashes the agent.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np


class BackendError(Exception):
    """Base of every error a backend raises; callers catch this one."""


class BackendUnavailable(BackendError):
    """The runtime is not installed, or the device is not present."""


class UnknownDevice(BackendError):
    """The device name is not one this backend understands."""


class ModelLoadError(BackendError):
    """The runtime could not load or compile the model."""


class InferenceError(BackendError):
    """The runtime failed while running a batch."""


@dataclass(frozen=True)
class ModelArtifacts:
    """What a backend needs to load a model: artifact files by format, and the input spec."""

    name: str
    files: Mapping[str, Path]  # format ("onnx", "tflite", ...) -> verified path inside the repository
    input_size: tuple[int, int]  # (height, width)
    layout: str = "NCHW"
    dtype: str = "float32"
    num_classes: int = 1000
    sha256: Mapping[str, str] = field(default_factory=dict)
    # format -> the artifact's input layout. `Session.infer` always takes the model's declared
    # layout (`layout` above, float32, normalised); a backend converts to its artifact's own.
    layouts: Mapping[str, str] = field(default_factory=dict)
    # format -> file name of artifacts the manifest lists but this device does not hold.
    missing: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendInfo:
    """What a backend declares about its runtime and devices; read by everything outside backends/.

    `devices`: the device names it may offer, `N` standing for an index (`cuda:N`), for docs and
    the console's simulator. `device_nodes`: globs of the /dev nodes its devices appear as (doctor
    checks their permissions, the probe cache is keyed on them). `usb_ids`: (vendor, product) ids
    of USB devices it serves. `shared`: device kind -> the physical resource it runs on, for the
    devices it shares with other backends (ONNX Runtime's `tensorrt:0` and PyTorch's `cuda:0` are
    one GPU, `cuda:0`); a kind not listed is a resource of its own. `packages`: distribution names
    (globs) whose versions decide what a probe finds. `extra`: the edge-agent extra that installs
    it; `install`: how to install it otherwise. `unit_devices`: the systemd `DeviceAllow=`
    specifiers its device nodes need (`char-nvidia*`, a path). `thread_budget`: whether its tenants
    sharing the host CPU with others get a share of the cores as threads (agent/frames/slo_threads.py);
    False where the runtime's own pools share the cores better than a fixed share (measured), which
    holds while no tenant on the CPU has a latency objective.
    """

    devices: tuple[str, ...] = ("cpu",)
    device_nodes: tuple[str, ...] = ()
    usb_ids: frozenset[tuple[str, str]] = frozenset()
    shared: Mapping[str, str] = field(default_factory=lambda: {"cpu": "cpu"})
    packages: tuple[str, ...] = ()
    extra: str | None = None
    install: str = ""
    unit_devices: tuple[str, ...] = ()
    thread_budget: bool = True

    def install_hint(self) -> str:
        """The command that installs this runtime, pinned as a release was tested (docs/install.md)."""
        if self.extra:
            if _CHECKOUT:
                return f"pip install -c deploy/constraints.txt -e '.[{self.extra}]'"
            return f"pip install -c deploy/constraints.txt 'edge-agent[{self.extra}]'"
        return self.install

    def resource(self, backend: str, device: str) -> str:
        """The physical resource `device` runs on: `cpu`, `cuda:0`, or `<backend>:<device>`."""
        d = device.lower()
        kind, _, index = d.replace(".", ":").partition(":")
        shared = {k.lower(): v for k, v in self.shared.items()}.get(kind)
        if shared is None:
            return f"{backend}:{d}"
        return shared if shared == "cpu" else f"{shared}:{index or '0'}"

    def owns_package(self, dist_name: str) -> bool:
        return any(fnmatch.fnmatch(dist_name.lower(), pattern) for pattern in self.packages)


# A source checkout (editable install) installs extras from `.`; a wheel install by name.
_CHECKOUT = (Path(__file__).resolve().parent.parent / "pyproject.toml").is_file()


class Session(Protocol):
    """One loaded model instance. `infer` blocks, and may run from a worker thread."""

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class Backend(ABC):
    """One inference runtime."""

    name: ClassVar[str]
    # Artifact formats this backend can load, in order of preference.
    formats: ClassVar[tuple[str, ...]] = ("onnx",)
    # A runtime known to crash the process while loading (not raise): each load is tried in a child
    # process first (backends/isolation.py).
    crash_prone: ClassVar[bool] = False
    # Devices, nodes, shared resources, packages and unit device classes (see BackendInfo).
    info: ClassVar[BackendInfo] = BackendInfo()

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(True, "") when usable here, else (False, why not). Must not raise."""

    @abstractmethod
    def devices(self) -> list[str]:
        """Canonical names of the devices present now (empty when unavailable)."""

    def canonical_device(self, device: str) -> str:
        """Match a user's device name case-insensitively against `devices()`; raise UnknownDevice.

        A kind without an index means the first of that kind (docs/protocol.md: `cuda` is `cuda:0`,
        `usb` is `usb:0`), for every backend.
        """
        found = match_device(self.devices(), device)
        if found is not None:
            return found
        present = ", ".join(self.devices()) or "none"
        raise UnknownDevice(f"{self.name} has no device {device!r} here (present: {present})")

    @abstractmethod
    def load(self, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> Session:
        """Load one instance of `model` on `device`; raises ModelLoadError or BackendUnavailable."""

    def artifact(self, model: ModelArtifacts) -> Path:
        for fmt in self.formats:
            if fmt in model.files:
                return model.files[fmt]
        listed = [fmt for fmt in self.formats if fmt in model.missing]
        if listed:
            raise ModelLoadError(
                f"model {model.name}: {model.missing[listed[0]]}, which {self.name} needs, is not installed "
                "on this device (copy it into the model folder; model.toml holds its sha256)"
            )
        raise ModelLoadError(
            f"model {model.name} has no artifact for {self.name} (needs one of {', '.join(self.formats)})"
        )


def match_device(devices: list[str], device: str) -> str | None:
    """The name in `devices` that `device` means (case-insensitive; a kind alone is its first), or None."""
    wanted = device.strip().lower()
    known = {d.lower(): d for d in devices}
    if wanted not in known and ":" not in wanted and f"{wanted}:0" in known:
        wanted = f"{wanted}:0"
    return known.get(wanted)


def usb_devices(ids: frozenset[tuple[str, str]] | set[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (vendor, product) ids of the USB devices plugged in now that are among `ids`, in bus order."""
    found: list[tuple[str, str]] = []
    for dev in sorted(glob.glob("/sys/bus/usb/devices/*")):
        try:
            pair = (Path(dev, "idVendor").read_text().strip(), Path(dev, "idProduct").read_text().strip())
        except OSError:
            continue
        if pair in ids:
            found.append(pair)
    return found


def module_present(name: str) -> bool:
    """Probe an optional runtime without importing it (some native libraries abort at import)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

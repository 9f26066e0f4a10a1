"""The backend contract every inference runtime implements.

A backend is one module with a `Backend` subclass registered by name in `backends.registry`.
Runtimes are imported lazily inside `available()`/`load()`, so a missing runtime is reported as
unavailable with its reason and never crashes the agent.
"""

from __future__ import annotations

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
        wanted = device.strip().lower()
        known = {d.lower(): d for d in self.devices()}
        if wanted not in known and ":" not in wanted and f"{wanted}:0" in known:
            wanted = f"{wanted}:0"
        if wanted in known:
            return known[wanted]
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


def module_present(name: str) -> bool:
    """Probe an optional runtime without importing it (some native libraries abort at import)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

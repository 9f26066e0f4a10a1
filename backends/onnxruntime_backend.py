"""ONNX Runtime: CPU, CUDA and TensorRT execution providers.

The instances of one tenant share one InferenceSession, which ONNX Runtime runs concurrently from
several threads: its optimised weights are held once. Measured with `python -m bench.footprint`
(EfficientNet-Lite0): a session per instance cost 28 MB of idle RSS per extra instance.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from backends import nvidia
from backends.base import (
    Backend,
    BackendInfo,
    BackendUnavailable,
    InferenceError,
    ModelArtifacts,
    ModelLoadError,
    module_present,
)

log = logging.getLogger(__name__)

_PROVIDER_BY_KIND = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OnnxRuntimeSession:
    """One instance: a handle on the session it shares with its tenant's other instances."""

    def __init__(self, backend: OnnxRuntimeBackend, key: tuple[Any, ...], session: Any) -> None:
        self._backend = backend
        self._key = key
        self._session = session
        self._input = session.get_inputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise InferenceError("onnxruntime: the session is closed")
        try:
            # run() releases the GIL and may run from several threads at once on one session, so
            # the instances run truly in parallel.
            out = session.run(None, {self._input: batch})[0]
        except Exception as exc:
            raise InferenceError(f"onnxruntime: {exc}") from exc
        return np.asarray(out)

    def close(self) -> None:
        if self._session is not None:
            self._session = None
            self._backend.release(self._key)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    formats = ("onnx",)
    info = BackendInfo(
        devices=("cpu", "cuda:N", "tensorrt:N"),
        device_nodes=nvidia.DEVICE_NODES,
        # The CUDA and TensorRT execution providers of one GPU run on that GPU.
        shared={"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"},
        packages=("onnxruntime", "onnxruntime-*"),
        install="a dependency of edge-agent: pip install -c deploy/constraints.txt onnxruntime, "
        "or onnxruntime-gpu for NVIDIA GPUs",
        unit_devices=nvidia.UNIT_DEVICES,
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._providers: list[str] | None = None
        self._shared: dict[tuple[Any, ...], list[Any]] = {}  # key -> [InferenceSession, refcount]

    def _available_providers(self) -> list[str]:
        with self._lock:
            if self._providers is None:
                import onnxruntime as ort

                self._providers = list(ort.get_available_providers())
            return self._providers

    def available(self) -> tuple[bool, str]:
        if not module_present("onnxruntime"):
            return False, f"onnxruntime is not installed ({self.info.install_hint()})"
        try:
            self._available_providers()
        except Exception as exc:
            return False, f"onnxruntime failed to import: {exc}"
        return True, ""

    def devices(self) -> list[str]:
        if not self.available()[0]:
            return []
        providers = self._available_providers()
        found = ["cpu"]
        gpus = _cuda_device_count() if "CUDAExecutionProvider" in providers else 0
        found += [f"cuda:{i}" for i in range(gpus)]
        if "TensorrtExecutionProvider" in providers:
            found += [f"tensorrt:{i}" for i in range(gpus)]
        return found

    def load(self, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> OnnxRuntimeSession:
        """One instance of `model`; instances with the same artifact, device and options share one
        session (released with the last of them)."""
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(reason)
        device = self.canonical_device(device)
        path = self.artifact(model)
        threads = int(options.get("threads") or 1)
        instances = int(options.get("instances") or 1)
        # The checksum too: a model replaced in place (`models add --force`) gets a session of its own.
        key = (os.fspath(path), model.sha256.get("onnx"), device, threads, instances)
        with self._lock:
            entry = self._shared.get(key)
            if entry is not None:
                entry[1] += 1
                return OnnxRuntimeSession(self, key, entry[0])
        session = self._create(path, device, threads, instances)
        with self._lock:
            entry = self._shared.setdefault(key, [session, 0])  # a concurrent load may have won
            entry[1] += 1
            return OnnxRuntimeSession(self, key, entry[0])

    def release(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            entry = self._shared.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._shared[key]

    def _create(self, path: Any, device: str, threads: int, instances: int) -> Any:
        import onnxruntime as ort

        kind, _, index = device.partition(":")
        provider = _PROVIDER_BY_KIND[kind]
        providers: list[Any] = [provider] if kind == "cpu" else [(provider, {"device_id": int(index)})]
        if kind != "cpu":
            providers.append("CPUExecutionProvider")
        opts = ort.SessionOptions()
        # A run's intra-op work uses its calling thread plus the pool's: the instances of one session
        # each bring their thread, and share threads - 1 pool threads each.
        opts.intra_op_num_threads = 1 if threads == 1 else instances * (threads - 1) + 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads == 1:
            # A single-thread session must not spin a thread pool against its sibling instances.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime could not load {path.name}: {exc}") from exc


def _cuda_device_count() -> int:
    """GPUs visible to CUDA, from the driver's device nodes (no CUDA import needed)."""
    try:
        return len([n for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit()])
    except OSError:
        return 0

"""ONNX Runtime: CPU, CUDA and TensorRT execution providers."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from backends.base import (
    Backend,
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
    def __init__(self, session: Any, input_name: str) -> None:
        self._session = session
        self._input = input_name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            # run() releases the GIL, so several instances run truly in parallel.
            out = self._session.run(None, {self._input: batch})[0]
        except Exception as exc:
            raise InferenceError(f"onnxruntime: {exc}") from exc
        return np.asarray(out)

    def close(self) -> None:
        self._session = None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    formats = ("onnx",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._providers: list[str] | None = None

    def _available_providers(self) -> list[str]:
        with self._lock:
            if self._providers is None:
                import onnxruntime as ort

                self._providers = list(ort.get_available_providers())
            return self._providers

    def available(self) -> tuple[bool, str]:
        if not module_present("onnxruntime"):
            return False, "onnxruntime is not installed (pip install onnxruntime)"
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
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(reason)
        import onnxruntime as ort

        device = self.canonical_device(device)
        kind, _, index = device.partition(":")
        provider = _PROVIDER_BY_KIND[kind]
        providers: list[Any] = [provider] if kind == "cpu" else [(provider, {"device_id": int(index)})]
        if kind != "cpu":
            providers.append("CPUExecutionProvider")
        opts = ort.SessionOptions()
        threads = int(options.get("threads") or 1)
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads == 1:
            # A single-thread session must not spin a thread pool against its sibling instances.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = self.artifact(model)
        try:
            session = ort.InferenceSession(os.fspath(path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime could not load {path.name}: {exc}") from exc
        return OnnxRuntimeSession(session, session.get_inputs()[0].name)


def _cuda_device_count() -> int:
    """GPUs visible to CUDA, from the driver's device nodes (no CUDA import needed)."""
    try:
        return len([n for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit()])
    except OSError:
        return 0

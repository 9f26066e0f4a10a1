"""OpenVINO: Intel CPU, integrated/discrete GPU, NPU, and AUTO.

Instances of one tenant share one compiled model (weights loaded once) and each get their own
infer request, which is how OpenVINO runs parallel streams.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

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


class OpenVinoSession:
    def __init__(self, backend: OpenVinoBackend, key: tuple[Any, ...], request: Any) -> None:
        self._backend = backend
        self._key = key
        self._request = request

    def infer(self, batch: np.ndarray) -> np.ndarray:
        try:
            # A synchronous infer on our own request releases the GIL while it runs.
            result = self._request.infer({0: batch}, share_inputs=True)
            return np.array(result[0])  # copy: the request's output buffer is reused
        except Exception as exc:
            raise InferenceError(f"openvino: {exc}") from exc

    def close(self) -> None:
        if self._request is not None:
            self._request = None
            self._backend.release(self._key)


class OpenVinoBackend(Backend):
    name = "openvino"
    formats = ("openvino", "onnx")
    info = BackendInfo(
        devices=("CPU", "GPU", "GPU.N", "NPU", "AUTO"),
        # Intel GPUs are DRM render nodes, Intel NPUs accel nodes.
        device_nodes=("/dev/dri/renderD*", "/dev/accel/accel*"),
        # OpenVINO's AUTO runs on the CPU until its GPU or NPU compile is done.
        shared={"cpu": "cpu", "auto": "cpu"},
        packages=("openvino",),
        extra="openvino",
        unit_devices=("char-drm", "char-accel"),
        # Two models with one thread each did worse than taking turns (docs/performance.md).
        thread_budget=False,
    )

    def __init__(self) -> None:
        self._lock = threading.RLock()  # load() holds it while _compile() asks for the core
        self._core: Any = None
        self._compiled: dict[tuple[Any, ...], list[Any]] = {}  # key -> [compiled model, refcount]

    def _get_core(self) -> Any:
        with self._lock:
            if self._core is None:
                import openvino as ov

                self._core = ov.Core()
            return self._core

    def available(self) -> tuple[bool, str]:
        if not module_present("openvino"):
            return False, f"openvino is not installed ({self.info.install_hint()})"
        try:
            self._get_core()
        except Exception as exc:
            return False, f"openvino failed to start: {exc}"
        return True, ""

    def devices(self) -> list[str]:
        if not self.available()[0]:
            return []
        found = list(self._get_core().available_devices)
        return [*found, "AUTO"] if found else []

    def load(self, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> OpenVinoSession:
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(reason)
        device = self.canonical_device(device)
        path = self.artifact(model)
        instances = int(options.get("instances") or 1)
        threads = options.get("threads")
        precision = options.get("precision")
        key = (os.fspath(path), device, instances, threads, precision)
        with self._lock:
            entry = self._compiled.get(key)
            if entry is None:
                entry = [self._compile(path, device, instances, threads, precision), 0]
                self._compiled[key] = entry
            entry[1] += 1
            compiled = entry[0]
        try:
            return OpenVinoSession(self, key, compiled.create_infer_request())
        except Exception as exc:
            self.release(key)
            raise ModelLoadError(f"openvino could not create an infer request: {exc}") from exc

    def _compile(self, path: Any, device: str, instances: int, threads: Any, precision: Any) -> Any:
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "THROUGHPUT" if instances > 1 else "LATENCY",
            "NUM_STREAMS": str(instances),
        }
        # Default: the device's fastest precision (bf16 on CPUs with AMX, fp16 on GPUs). "fp32" asks
        # for exact fp32 results, "fp16" for half precision.
        if precision in ("fp32", "fp16"):
            config["INFERENCE_PRECISION_HINT"] = "f32" if precision == "fp32" else "f16"
        if threads and device.upper().startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = int(threads) * instances
        # Compiled blobs cached across restarts (a GPU/NPU compile takes seconds to minutes): where
        # the service says (systemd's CacheDirectory=, via EDGE_AGENT_CACHE_DIR), not by default.
        cache_root = os.environ.get("EDGE_AGENT_CACHE_DIR")
        if cache_root:
            config["CACHE_DIR"] = os.path.join(cache_root, "openvino")
        try:
            core = self._get_core()
            return core.compile_model(core.read_model(os.fspath(path)), device, config)
        except Exception as exc:
            raise ModelLoadError(f"openvino could not compile {path} for {device}: {exc}") from exc

    def release(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            entry = self._compiled.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._compiled[key]

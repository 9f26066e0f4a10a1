"""PyTorch: the GPU path where PyTorch with CUDA is installed but TensorRT is not (also runs on CPU).

Loads the `torch.export` artifact (`model.pt2`). On CUDA: channels-last memory format, optional fp16
(`precision: "fp16"`), and one CUDA graph per batch-size bucket (1, 2, 4, ... up to the tenant's
`batch.max_size`), captured on first use: a replay costs a few microseconds of CPU instead of a
kernel launch per layer, which is what makes small batches fast on a big GPU.
"""

from __future__ import annotations

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


def _buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


class TorchSession:
    def __init__(self, module: Any, device: str, fp16: bool, graphs: bool, max_batch: int) -> None:
        import torch

        self._torch = torch
        self._module = module
        self._device = torch.device(device)
        self._cuda = self._device.type == "cuda"
        self._dtype = torch.float16 if fp16 and self._cuda else torch.float32
        self._graphs_enabled = graphs and self._cuda
        self._buckets = _buckets(max(1, max_batch))
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}  # bucket -> (graph, static in, static out)
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self._device) if self._cuda else None

    def _capture(self, bucket: int, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        torch = self._torch
        static_in = torch.zeros((bucket, *shape), device=self._device, dtype=self._dtype).contiguous(
            memory_format=torch.channels_last
        )
        with torch.cuda.stream(self._stream), torch.inference_mode():
            for _ in range(3):  # warm up on the side stream before capture, as CUDA graphs require
                self._module(static_in)
            torch.cuda.current_stream().synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                static_out = self._module(static_in)
        return graph, static_in, static_out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        n = batch.shape[0]
        try:
            with self._lock, torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(batch))
                bucket = next((b for b in self._buckets if b >= n), None)
                if not self._graphs_enabled or bucket is None:
                    x = x.to(self._device, dtype=self._dtype, non_blocking=True)
                    if self._cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    return self._module(x).float().cpu().numpy()
                if bucket not in self._graphs:
                    self._graphs[bucket] = self._capture(bucket, tuple(batch.shape[1:]))
                graph, static_in, static_out = self._graphs[bucket]
                static_in[:n].copy_(x.to(self._dtype), non_blocking=False)
                graph.replay()
                return static_out[:n].float().cpu().numpy()
        except RuntimeError as exc:
            raise InferenceError(f"torch: {exc}") from exc

    def close(self) -> None:
        self._graphs.clear()
        self._module = None


class TorchBackend(Backend):
    name = "torch"
    formats = ("torch",)
    info = BackendInfo(
        devices=("cpu", "cuda:N"),
        device_nodes=nvidia.DEVICE_NODES,
        shared={"cpu": "cpu", "cuda": "cuda"},
        packages=("torch",),
        extra="torch",
        unit_devices=nvidia.UNIT_DEVICES,
    )

    def available(self) -> tuple[bool, str]:
        if not module_present("torch"):
            return False, f"PyTorch is not installed ({self.info.install_hint()})"
        return True, ""

    def devices(self) -> list[str]:
        if not self.available()[0]:
            return []
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return ["cpu"] + [f"cuda:{i}" for i in range(gpus)]

    def load(self, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> TorchSession:
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(reason)
        import torch

        device = self.canonical_device(device)
        path = self.artifact(model)
        try:
            module = torch.export.load(os.fspath(path)).module()
            fp16 = options.get("precision") == "fp16" and device.startswith("cuda")
            module = module.to(device)
            if fp16:
                module = module.half()
            if device.startswith("cuda"):
                module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            else:
                torch.set_num_threads(int(options.get("threads") or 1))
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(f"torch could not load {path.name}: {exc}") from exc
        graphs = bool(options.get("cuda_graphs", True))
        return TorchSession(module, device, fp16, graphs, int(options.get("max_batch") or 1))

"""NVIDIA TensorRT: a native engine built from the ONNX artifact on first load.

Building an engine takes minutes on a Jetson, so it is serialised and cached per model sha256, GPU
name, TensorRT version, precision and maximum batch size (in `$EDGE_AGENT_CACHE_DIR` or
~/.cache/edge-agent/tensorrt). Device buffers come from PyTorch when it is installed (JetPack and
NGC images have both), which keeps this module free of a separate CUDA binding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
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


def cache_dir() -> Path:
    root = os.environ.get("EDGE_AGENT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "edge-agent"
    )
    return Path(root) / "tensorrt"


class TensorRtSession:
    def __init__(self, engine: Any, device: str) -> None:
        import torch

        self._torch = torch
        self._engine = engine
        self._context = engine.create_execution_context()
        self._device = torch.device(device)
        self._stream = torch.cuda.Stream(self._device)
        self._input = engine.get_tensor_name(0)
        self._output = engine.get_tensor_name(1)
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        try:
            with self._lock, torch.cuda.stream(self._stream):
                x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._device)
                self._context.set_input_shape(self._input, tuple(x.shape))
                out = torch.empty(tuple(self._context.get_tensor_shape(self._output)), device=self._device)
                self._context.set_tensor_address(self._input, x.data_ptr())
                self._context.set_tensor_address(self._output, out.data_ptr())
                if not self._context.execute_async_v3(self._stream.cuda_stream):
                    raise InferenceError("tensorrt: execute failed")
                self._stream.synchronize()
                return out.cpu().numpy()
        except RuntimeError as exc:
            raise InferenceError(f"tensorrt: {exc}") from exc

    def close(self) -> None:
        self._context = None


class TensorRtBackend(Backend):
    name = "tensorrt"
    formats = ("onnx",)
    crash_prone = True  # an engine build can abort the process (and the child fills the engine cache)
    info = BackendInfo(
        devices=("cuda:N",),
        device_nodes=nvidia.DEVICE_NODES,
        shared={"cuda": "cuda"},
        packages=("tensorrt", "tensorrt-*", "torch"),
        install="JetPack, or pip install tensorrt on x86 with CUDA",
        unit_devices=nvidia.UNIT_DEVICES,
    )

    def available(self) -> tuple[bool, str]:
        if not module_present("tensorrt"):
            return False, f"TensorRT is not installed ({self.info.install})"
        if not module_present("torch"):
            return False, "the TensorRT backend needs PyTorch with CUDA for device buffers"
        if not self.devices():
            return False, "no CUDA GPU visible"
        return True, ""

    def devices(self) -> list[str]:
        if not (module_present("tensorrt") and module_present("torch")):
            return []
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []

    def load(self, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> TensorRtSession:
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(reason)
        import tensorrt as trt
        import torch

        device = self.canonical_device(device)
        fp16 = options.get("precision") == "fp16"
        max_batch = int(options.get("max_batch") or 1)
        gpu = torch.cuda.get_device_name(torch.device(device))
        key = hashlib.sha256(
            f"{model.sha256.get('onnx')}|{gpu}|{trt.__version__}|{fp16}|{max_batch}".encode()
        ).hexdigest()[:24]
        path = cache_dir() / f"{model.name}-{key}.engine"
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if not path.exists():
            log.info(
                "building TensorRT engine for %s on %s (fp16=%s, max batch %d)",
                model.name,
                gpu,
                fp16,
                max_batch,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(self._build(trt, self.artifact(model), model, fp16, max_batch))
            os.replace(tmp, path)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ModelLoadError(f"tensorrt could not deserialise {path}")
        return TensorRtSession(engine, device)

    @staticmethod
    def _build(trt: Any, onnx_path: Path, model: ModelArtifacts, fp16: bool, max_batch: int) -> bytes:
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelLoadError(f"tensorrt could not parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        h, w = model.input_size
        profile = builder.create_optimization_profile()
        name = network.get_input(0).name
        profile.set_shape(name, (1, 3, h, w), (max_batch, 3, h, w), (max_batch, 3, h, w))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise ModelLoadError("tensorrt engine build failed")
        return bytes(engine)

"""TensorFlow Lite / LiteRT on the CPU (XNNPACK), fp32 or full-integer int8 models.

The runtime is ai-edge-litert (`ai_edge_litert.interpreter`) or the older tflite-runtime. One
interpreter per instance (an interpreter is not thread-safe); the agent's NCHW float batch is
converted to the artifact's layout and, for int8 models, quantised with the model's own scale.
"""

from __future__ import annotations

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

# LiteRT, or the older TFLite runtime: either provides the interpreter.
RUNTIME_PACKAGES = ("ai-edge-litert", "tflite-runtime")


def interpreter_module() -> Any:
    """The installed LiteRT/TFLite interpreter module, or None."""
    if module_present("ai_edge_litert"):
        from ai_edge_litert import interpreter

        return interpreter
    if module_present("tflite_runtime"):
        from tflite_runtime import interpreter  # type: ignore[no-redef,unused-ignore]

        return interpreter
    return None


class TfliteSession:
    """Runs one interpreter; converts layout and quantisation at the edges."""

    def __init__(self, interpreter: Any, layout: str) -> None:
        self._it = interpreter
        self._lock = threading.Lock()
        self._layout = layout
        self._in = interpreter.get_input_details()[0]
        self._out = interpreter.get_output_details()[0]
        self._batch = int(self._in["shape"][0])

    def _prepare(self, batch: np.ndarray) -> np.ndarray:
        x = batch.transpose(0, 2, 3, 1) if self._layout == "NHWC" and batch.shape[1] == 3 else batch
        dtype = self._in["dtype"]
        if dtype in (np.int8, np.uint8):
            scale, zero = self._in["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.rint(x / scale + zero), info.min, info.max).astype(dtype)
        return np.ascontiguousarray(x, dtype=dtype)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:  # the agent gives each instance one thread; this guards misuse
            try:
                x = self._prepare(batch)
                if x.shape[0] != self._batch:
                    self._it.resize_tensor_input(self._in["index"], list(x.shape))
                    self._it.allocate_tensors()
                    self._in = self._it.get_input_details()[0]
                    self._out = self._it.get_output_details()[0]
                    self._batch = x.shape[0]
                self._it.set_tensor(self._in["index"], x)
                self._it.invoke()
                out = self._it.get_tensor(self._out["index"])
            except (RuntimeError, ValueError) as exc:
                raise InferenceError(f"tflite: {exc}") from exc
        if out.dtype in (np.int8, np.uint8):
            scale, zero = self._out["quantization"]
            return (out.astype(np.float32) - zero) * scale
        return np.array(out, dtype=np.float32)

    def close(self) -> None:
        self._it = None


class TfliteBackend(Backend):
    name = "tflite"
    formats = ("tflite", "tflite_int8")
    info = BackendInfo(packages=RUNTIME_PACKAGES, extra="tflite")

    def available(self) -> tuple[bool, str]:
        if interpreter_module() is None:
            return False, f"no TFLite runtime ({self.info.install_hint()}, or tflite-runtime)"
        return True, ""

    def devices(self) -> list[str]:
        return ["cpu"] if self.available()[0] else []

    def load(self, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> TfliteSession:
        module = interpreter_module()
        if module is None:
            raise BackendUnavailable(self.available()[1])
        self.canonical_device(device)
        fmt = "tflite_int8" if options.get("precision") == "int8" else "tflite"
        path = model.files.get(fmt)
        if path is None:
            raise ModelLoadError(f"model {model.name} has no {fmt} artifact (run models/build.py)")
        try:
            interpreter = module.Interpreter(
                model_path=os.fspath(path), num_threads=int(options.get("threads") or 1)
            )
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"tflite could not load {path.name}: {exc}") from exc
        return TfliteSession(interpreter, model.layouts.get(fmt, model.layout))

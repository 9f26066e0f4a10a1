"""A test double with a controllable delay: for scheduler unit tests and fleet simulations only.

Never a substitute for a real runtime in a test that claims a runtime works.
Options: `delay_ms` per batch, `per_item_ms` per frame, `fail_load` (a message) to make load fail.
A test hangs a session by setting its `gate` to an unset Event: `infer` then blocks until it is set;
option `load_gate` (an Event) hangs `load` the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from backends.base import Backend, BackendInfo, ModelArtifacts, ModelLoadError


class FakeSession:
    def __init__(self, num_classes: int, delay_ms: float, per_item_ms: float) -> None:
        self.num_classes = num_classes
        self.delay_s = delay_ms / 1000.0
        self.per_item_s = per_item_ms / 1000.0
        self.batches: list[int] = []  # batch sizes seen, for tests
        self._lock = threading.Lock()
        self.closed = False
        self.gate: threading.Event | None = None  # a hung runtime call, for stall tests

    def infer(self, batch: np.ndarray) -> np.ndarray:
        gate = self.gate
        if gate is not None:
            gate.wait()
        time.sleep(self.delay_s + self.per_item_s * len(batch))
        with self._lock:
            self.batches.append(len(batch))
        # Deterministic answer: the class is the mean pixel value, scaled.
        logits = np.zeros((len(batch), self.num_classes), np.float32)
        classes = (np.abs(batch.reshape(len(batch), -1).mean(axis=1)) * 100).astype(int) % self.num_classes
        logits[np.arange(len(batch)), classes] = 10.0
        return logits

    def close(self) -> None:
        self.closed = True


class FakeBackend(Backend):
    name = "fake"
    formats = ("onnx", "tflite", "fake")
    info = BackendInfo(devices=("cpu", "slow"))

    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []

    def available(self) -> tuple[bool, str]:
        return True, ""

    def devices(self) -> list[str]:
        return ["cpu", "slow"]

    def load(self, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> FakeSession:
        self.canonical_device(device)
        if options.get("fail_load"):
            raise ModelLoadError(str(options["fail_load"]))
        time.sleep(float(options.get("load_ms", 0)) / 1000.0)
        if options.get("load_gate") is not None:  # a load that hangs until the test sets the Event
            options["load_gate"].wait()
        session = FakeSession(
            model.num_classes, float(options.get("delay_ms", 1.0)), float(options.get("per_item_ms", 0.0))
        )
        self.sessions.append(session)
        return session

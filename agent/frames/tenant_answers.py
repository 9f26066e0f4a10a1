"""A tenant's answers: the result of a served frame or a coded error, and the metric row of each.

Every outcome goes out through `emit` once and is counted in the tenant's stats; the worker
decides which outcome a frame gets, this module only builds and sends it (docs/protocol.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.frames.ingest import Frame
from agent.frames.postprocess import DetectionOptions, detections, top_k
from agent.observability.stats import TenantStats
from agent.protocol.schemas import (
    Detection,
    DetectionResult,
    ErrorCode,
    ErrorInfo,
    ErrorResult,
    InferResult,
    TenantRef,
    TenantSpec,
    Timing,
)
from agent.service.model_repo import Model

Outcome = InferResult | DetectionResult | ErrorResult
EmitFn = Callable[[Frame, Outcome], None]
RecordFn = Callable[[dict[str, Any]], None]


class Answers:
    """Builds and sends a tenant's outcomes (thread-safe: emit, record and stats are)."""

    def __init__(
        self,
        spec: TenantSpec,
        model: Model,
        stats: TenantStats,
        emit: EmitFn,
        record: RecordFn | None,
        top_k: int,
    ) -> None:
        self._spec = spec
        self._model = model
        self._stats = stats
        self._emit = emit
        self._record = record
        self._top_k = top_k
        self.device = spec.device  # the canonical device name once loaded (rows, results)
        self.detect: DetectionOptions | None = None  # a detector's options (set at load)
        self.probabilities = False  # the model outputs probabilities, not logits (set at load)
        self.last_detections: list[Detection] | None = None  # the last frame's boxes (telemetry)

    def error(self, frame: Frame, code: ErrorCode, message: str) -> None:
        self._stats.error()
        row = self.row(frame, code, instance=None, timing=None)  # stamped before the answer can leave
        self._emit(
            frame,
            ErrorResult(
                request_id=frame.request_id, model=frame.model, error=ErrorInfo(code=code, message=message)
            ),
        )
        if self._record:
            self._record(row)

    def shed(self, frame: Frame, objective_ms: float) -> None:
        """A frame the objective policy gave up on: answered now rather than late."""
        self._stats.shed()
        self.error(frame, "shed", f"it could no longer be answered within the {objective_ms:g} ms objective")

    def served(
        self,
        frame: Frame,
        ref: TenantRef,
        row: np.ndarray,
        size: tuple[int, int],
        timing: Timing,
        batch: int,
    ) -> None:
        """A frame's result from its row of the batch output (`size`: its width and height)."""
        result = self._result(frame, ref, row, size, timing, batch)
        self._stats.served(timing.total, timing.queue, timing.preprocess, timing.infer)
        objective = self._spec.latency_objective_ms
        if objective is not None:
            self._stats.objective(timing.total, timing.total - timing.queue, objective)
        # The row's time is taken before the answer goes to the outbox: a row stamped after a broker
        # went away is then an answer the broker cannot have had (tests/test_exactly_once.py relies on it).
        done = self.row(frame, "ok", ref.instance, timing)
        self._emit(frame, result)
        if self._record:
            self._record(done)

    def _result(
        self, frame: Frame, ref: TenantRef, row: np.ndarray, size: tuple[int, int], timing: Timing, batch: int
    ) -> InferResult | DetectionResult:
        if self.detect is not None:
            found = detections(self._model, row, size, self.detect)
            self.last_detections = found
            return DetectionResult(
                request_id=frame.request_id,
                model=frame.model,
                tenant=ref,
                version=self._model.manifest.version,
                detections=found,
                timing_ms=timing,
                batch_size=batch,
            )
        return InferResult(
            request_id=frame.request_id,
            model=frame.model,
            tenant=ref,
            version=self._model.manifest.version,
            top=top_k(row, self._model.labels, self._top_k, self.probabilities),
            timing_ms=timing,
            batch_size=batch,
        )

    def row(self, frame: Frame, status: str, instance: int | None, timing: Timing | None) -> dict[str, Any]:
        """The metrics row of one frame (agent/observability/metrics.py)."""
        return {
            "ts": time.time(),
            "request_id": frame.request_id,
            "model": frame.model,
            "backend": self._spec.backend,
            "device": self.device,
            "instance": instance,
            "queue_ms": timing.queue if timing else None,
            "preprocess_ms": timing.preprocess if timing else None,
            "infer_ms": timing.infer if timing else None,
            "total_ms": timing.total if timing else None,
            "status": status,
        }

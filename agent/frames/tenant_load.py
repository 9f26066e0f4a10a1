"""Loading a tenant: one runtime session per instance, each warmed up at every batch size it will
run, its output checked against what the model says it is (a classifier or a detector)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.frames import faults
from agent.frames.postprocess import DetectionOptions, outputs_probabilities
from agent.frames.scheduler import warmup_batch_sizes
from agent.protocol.schemas import TenantSpec
from agent.service.model_repo import Model
from backends import isolation
from backends.base import Backend, BackendError, ModelLoadError, Session


def item_shape(model: Model) -> tuple[int, int, int]:
    """One frame's tensor shape as the model takes it."""
    h, w = model.input.size
    return (3, h, w) if model.input.layout == "NCHW" else (h, w, 3)


def load_instances(
    sessions: list[Session],
    backend: Backend,
    model: Model,
    spec: TenantSpec,
    device: str,
    options: Mapping[str, Any],
    fault: faults.Fault | None,
    detect: DetectionOptions | None,
) -> bool:
    """Load `spec.instances` sessions into `sessions` (the caller closes them if this raises) and
    warm each up; returns whether the model outputs probabilities (not logits). Blocking."""
    probabilities: bool | None = None
    item = item_shape(model)
    for _ in range(spec.instances):
        session = isolation.load(backend, model.artifacts, device, options)
        sessions.append(session)
        # The first run at each batch size compiles kernels or re-plans memory (OpenVINO's
        # dynamic shapes: ~100 ms of stalled frames measured). Do it now, not on frames.
        for size in warmup_batch_sizes(spec.batch.max_size):
            try:
                if fault is not None:
                    fault.inject(0)
                out = session.infer(np.zeros((size, *item), np.dtype(model.input.dtype)))
            except BackendError as exc:
                raise ModelLoadError(
                    f"warm-up at batch {size} failed: {exc} (check [input] size, layout and dtype "
                    "in model.toml, and the tenant's batch.max_size, against the model)"
                ) from exc
            check_output(model, np.asarray(out), size, detect)
            if probabilities is None and detect is None:
                probabilities = outputs_probabilities(np.asarray(out))
    return bool(probabilities)


def check_output(model: Model, out: np.ndarray, size: int, detect: DetectionOptions | None) -> None:
    """A classifier answers (batch, classes), one class per label: refused at load, not
    discovered frame by frame. Trailing 1-sized dimensions (N, C, 1, 1) are accepted.
    A detector answers in its decoder's layout (docs/detection.md): (batch, boxes, 6) rows of x1,
    y1, x2, y2, score, class; "ssd" (batch, 1, boxes, 7); "yolo" (batch, 4 + classes, boxes)."""
    if detect is not None:
        decoder = model.manifest.detection.decoder if model.manifest.detection else "xyxy_score_class"
        expected = {
            "xyxy_score_class": (3, lambda s: s[2] == 6, "(batch, boxes, 6)"),
            "ssd": (4, lambda s: s[1] == 1 and s[3] == 7, "(batch, 1, boxes, 7)"),
            "yolo": (3, lambda s: min(s[1], s[2]) >= 5, "(batch, 4 + classes, boxes)"),
        }[decoder]
        rank, fits, shape = expected
        if out.ndim != rank or out.shape[0] != size or not fits(out.shape):
            raise ModelLoadError(
                f"the model answers a batch of {size} with shape {tuple(out.shape)}; a detector with "
                f"decoder {decoder} must output {shape}"
            )
        return
    if out.ndim < 2 or out.shape[0] != size or any(d != 1 for d in out.shape[2:]):
        raise ModelLoadError(
            f"the model answers a batch of {size} with shape {tuple(out.shape)}; "
            "a classifier must output (batch, classes)"
        )
    labels = len(model.labels)
    if labels and out.shape[1] != labels:
        raise ModelLoadError(
            f"the model outputs {out.shape[1]} classes but {model.manifest.labels} has {labels} "
            "labels: one label per class, in output order"
        )

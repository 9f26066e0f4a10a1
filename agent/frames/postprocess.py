"""Postprocessing of a model's output row: a classifier's top-k classes with their scores, a
detector's boxes (agent/frames/detection.py); payloads in docs/protocol.md."""

from __future__ import annotations

import numpy as np

from agent.frames.detection import DetectionOptions, decode, options_for
from agent.protocol.schemas import Detection, TenantSpec, TopK
from agent.service.model_repo import Model


def outputs_probabilities(rows: np.ndarray) -> bool:
    """A model whose outputs are already probabilities (non-negative, each row summing to 1, within
    what uint8 quantisation loses); decided once per tenant at warm-up, not frame by frame."""
    rows = rows.reshape(rows.shape[0], -1).astype(np.float64)
    return bool(rows.min() >= 0.0 and np.abs(rows.sum(axis=1) - 1.0).max() < 0.02)


def top_k(logits: np.ndarray, labels: tuple[str, ...], k: int, probabilities: bool = False) -> list[TopK]:
    """Scores of the k best classes, best first: softmax of logits, or the model's own
    probabilities when it outputs them."""
    logits = logits.astype(np.float64, copy=False)
    if probabilities:
        probs = logits
    else:
        exp = np.exp(logits - logits.max())
        probs = exp / exp.sum()
    k = min(k, probs.size)
    best = np.argpartition(-probs, k - 1)[:k]
    best = best[np.argsort(-probs[best])]
    return [
        TopK(index=int(i), label=labels[i] if i < len(labels) else str(i), score=round(float(probs[i]), 6))
        for i in best
    ]


def detection_options(model: Model, spec: TenantSpec) -> DetectionOptions | None:
    """A detection tenant's options (None for a classifier); a ValueError says what is wrong."""
    asked = [name for name in ("min_score", "max_detections", "labels") if getattr(spec, name) is not None]
    detection = model.manifest.detection
    if detection is None:
        if asked:
            raise ValueError(
                f"{', '.join(asked)} apply to detection models; {model.name} is a {model.manifest.task} model"
            )
        return None
    return options_for(detection, model.labels, spec.min_score, spec.max_detections, spec.labels)


def detections(
    model: Model, row: np.ndarray, frame_size: tuple[int, int], options: DetectionOptions
) -> list[Detection]:
    """One frame's boxes from a detector's output row (agent/frames/detection.py)."""
    assert model.manifest.detection is not None  # a detection tenant's model, checked at load
    return decode(row, model.manifest.detection, model.input, model.labels, frame_size, options)

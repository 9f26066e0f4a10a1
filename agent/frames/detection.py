"""A detector's output row -> boxes in 0..1 of the original frame (docs/detection.md).

Pure numpy, no runtime: the reference decoder the backends are checked against. Steps, per frame:
the model's rows (x1, y1, x2, y2, score, class) above the score threshold and of the wanted
classes; non-maximum suppression where the graph has none (across classes by default: one object
reported as both "car" and "truck" keeps its best class); boxes mapped from the model input back to
the frame, undoing the stretch, letterbox or crop of preprocessing; the best `max_detections`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.protocol.schemas import Box, Detection
from agent.service.model_repo import DetectionSpec, InputSpec


@dataclass(frozen=True)
class DetectionOptions:
    """A tenant's choices over the model's defaults (TenantSpec.min_score, max_detections, labels)."""

    min_score: float
    max_detections: int
    classes: frozenset[int] | None = None  # None: every class


def options_for(
    spec: DetectionSpec,
    labels: tuple[str, ...],
    min_score: float | None = None,
    max_detections: int | None = None,
    wanted: list[str] | None = None,
) -> DetectionOptions:
    """The tenant's options checked against the model; an unknown label is a ValueError."""
    classes: frozenset[int] | None = None
    if wanted:
        index = {label.lower(): i for i, label in enumerate(labels)}
        unknown = [name for name in wanted if name.lower() not in index]
        if unknown:
            raise ValueError(
                f"labels {unknown} are not classes of this model (e.g. {', '.join(labels[:5])}; "
                "see its labels file)"
            )
        classes = frozenset(index[name.lower()] for name in wanted)
    return DetectionOptions(
        min_score=spec.score_threshold if min_score is None else min_score,
        max_detections=spec.max_detections if max_detections is None else max_detections,
        classes=classes,
    )


def frame_geometry(spec: InputSpec, width: int, height: int) -> tuple[float, float, float, float]:
    """(x0, y0, sx, sy): a point (u, v) in 0..1 of the model input is at ((u - x0) * sx,
    (v - y0) * sy) in 0..1 of a width x height frame, for the spec's resize mode."""
    in_h, in_w = spec.size
    if spec.resize == "stretch":
        return 0.0, 0.0, 1.0, 1.0
    if spec.resize == "letterbox":
        scale = min(in_w / width, in_h / height)
        used_w, used_h = width * scale / in_w, height * scale / in_h  # fractions of the input used
        return (1.0 - used_w) / 2.0, (1.0 - used_h) / 2.0, 1.0 / used_w, 1.0 / used_h
    # Centre crop (agent/frames/preprocess.py): the input shows the crop_w x crop_h middle of the frame.
    side = min(width, height) * spec.crop_fraction
    crop_w, crop_h = side * in_w / max(in_h, in_w), side * in_h / max(in_h, in_w)
    left, top = (width - crop_w) / 2.0, (height - crop_h) / 2.0
    return -left / crop_w, -top / crop_h, crop_w / width, crop_h / height


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = w * h
        union = areas[best] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def decode(
    output: np.ndarray,
    spec: DetectionSpec,
    input_spec: InputSpec,
    labels: tuple[str, ...],
    frame_size: tuple[int, int],
    options: DetectionOptions,
) -> list[Detection]:
    """One frame's detections from its output rows (N, 6); frame_size is (width, height)."""
    rows = np.asarray(output, dtype=np.float64).reshape(-1, 6)
    rows = rows[np.isfinite(rows).all(axis=1)]
    keep = rows[:, 4] >= options.min_score
    classes = rows[:, 5].round().astype(np.int64)
    if options.classes is not None:
        keep &= np.isin(classes, list(options.classes))
    rows, classes = rows[keep], classes[keep]
    boxes = rows[:, :4].copy()
    if spec.coordinates == "input_pixels":
        in_h, in_w = input_spec.size
        boxes /= np.array([in_w, in_h, in_w, in_h], dtype=np.float64)
    if spec.nms_iou is not None and len(rows):
        if spec.class_agnostic_nms:
            kept = nms(boxes, rows[:, 4], spec.nms_iou)
        else:
            # Offset each class into its own region so one NMS pass never compares two classes.
            shifted = boxes + classes[:, None] * 2.0
            kept = nms(shifted, rows[:, 4], spec.nms_iou)
        rows, classes, boxes = rows[kept], classes[kept], boxes[kept]
    order = np.argsort(-rows[:, 4], kind="stable")[: options.max_detections]
    x0, y0, sx, sy = frame_geometry(input_spec, *frame_size)
    detections: list[Detection] = []
    for i in order:
        u1, v1, u2, v2 = boxes[i]
        box = np.clip([(u1 - x0) * sx, (v1 - y0) * sy, (u2 - x0) * sx, (v2 - y0) * sy], 0.0, 1.0)
        if box[2] <= box[0] or box[3] <= box[1]:
            continue  # nothing of it inside the frame (letterbox padding)
        index = int(classes[i])
        detections.append(
            Detection(
                index=index,
                label=labels[index] if 0 <= index < len(labels) else str(index),
                score=round(float(rows[i, 4]), 6),
                box=Box(
                    x_min=round(float(box[0]), 6),
                    y_min=round(float(box[1]), 6),
                    x_max=round(float(box[2]), 6),
                    y_max=round(float(box[3]), 6),
                ),
            )
        )
    return detections

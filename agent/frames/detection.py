"""A detector's output row -> boxes in 0..1 of the original frame (docs/detection.md).

Pure numpy, no runtime: the reference decoder the backends are checked against. Steps, per frame:
the output as rows (x1, y1, x2, y2, score, class: the SSD and YOLO layouts are turned into them)
above the score threshold and of the wanted classes; non-maximum suppression where the graph has
none (across classes by default: one object reported as both "car" and "truck" keeps its best
class); boxes mapped from the model input back to the frame, undoing the stretch, letterbox or
crop of preprocessing; the best `max_detections`.
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


def as_rows(output: np.ndarray, decoder: str) -> np.ndarray:
    """One frame's output in the decoder's layout -> rows (N, 6) of x1, y1, x2, y2, score, class."""
    out = np.asarray(output, dtype=np.float64)
    if decoder == "ssd":
        rows = out.reshape(-1, 7)
        ended = np.flatnonzero(rows[:, 0] < 0)  # image_id -1: no more boxes
        rows = rows[: ended[0]] if ended.size else rows
        return rows[:, [3, 4, 5, 6, 2, 1]]
    if decoder == "yolo":
        table = out.reshape(out.shape[-2], out.shape[-1]) if out.ndim >= 2 else out.reshape(1, -1)
        if table.shape[0] < table.shape[1]:
            table = table.T  # (4 + classes, N) -> one row per candidate box
        if table.shape[1] < 5:
            return np.zeros((0, 6))
        scores = table[:, 4:]
        best = scores.argmax(axis=1)
        cx, cy, w, h = table[:, 0], table[:, 1], table[:, 2], table[:, 3]
        return np.stack(
            [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, scores[np.arange(len(table)), best], best],
            axis=1,
        )
    return out.reshape(-1, 6)


def decode(
    output: np.ndarray,
    spec: DetectionSpec,
    input_spec: InputSpec,
    labels: tuple[str, ...],
    frame_size: tuple[int, int],
    options: DetectionOptions,
) -> list[Detection]:
    """One frame's detections from its output; frame_size is (width, height)."""
    rows = as_rows(output, spec.decoder)
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

"""Frigate's `zmq` detector protocol, as its client (frigate/detectors/plugins/zmq_ipc.py) speaks it.

Every request is a multipart message whose first frame is a JSON object:
- `{"model_request": true, "model_name": ...}`: the handshake, answered
  `{"model_available": bool, "model_loaded": bool}`;
- `{"model_data": true, "model_name": ...}` and the model file: answered
  `{"model_saved": bool, "model_loaded": bool}`;
- `{"shape": [...], "dtype": "uint8"|"float32", "model_type": ...}` and the tensor's bytes (C order):
  answered with one frame, a float32 (20, 6) array of `[class_id, score, y_min, x_min, y_max, x_max]`
  rows, boxes in 0..1 of the tensor, best first, unused rows zero.
Pure functions: no sockets, no tenants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

ROWS = 20
ZERO_ROWS = np.zeros((ROWS, 6), np.float32).tobytes()  # Frigate's own answer on every error
MAX_SIDE = 4096  # a tensor side larger than this is refused (Frigate's defaults send 320)


class BadRequest(ValueError):
    """A request answered with zero rows; the message says why (logged)."""


@dataclass(frozen=True)
class Handshake:
    model_name: str


@dataclass(frozen=True)
class ModelData:
    model_name: str
    data: bytes


@dataclass(frozen=True)
class Tensor:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB, what a camera frame decodes to
    model_type: str


Request = Handshake | ModelData | Tensor


def parse(frames: list[bytes]) -> Request:
    """One request's frames (the REQ envelope removed) -> what it asks; BadRequest otherwise."""
    if not frames:
        raise BadRequest("empty request")
    try:
        header = json.loads(frames[0])
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the first frame is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise BadRequest("the first frame is not a JSON object")
    if header.get("model_request") is True or header.get("model_data") is True:
        name = header.get("model_name")
        if not isinstance(name, str) or not name or len(name) > 255 or "/" in name or name.startswith("."):
            raise BadRequest(f"model_name {str(name)[:80]!r} is not a file name")
        if header.get("model_request") is True:
            return Handshake(name)
        if len(frames) != 2:
            raise BadRequest(f"model data comes as 2 frames, not {len(frames)}")
        return ModelData(name, frames[1])
    if len(frames) != 2:
        raise BadRequest(f"an inference request is 2 frames (header, tensor), not {len(frames)}")
    model_type = header.get("model_type")
    return Tensor(pixels(header.get("shape"), header.get("dtype"), frames[1]), str(model_type or "ssd"))


def pixels(shape: Any, dtype: Any, data: bytes) -> np.ndarray:
    """Frigate's tensor -> (H, W, 3) uint8. Batch 1, NHWC or NCHW (Frigate's `input_tensor`); uint8,
    or float32 either 0..1 (`input_dtype: float`) or 0..255 (`float_denorm`)."""
    if dtype not in ("uint8", "float32"):
        raise BadRequest(f"dtype {str(dtype)[:40]!r}: uint8 or float32 (Frigate's input_dtype int or float)")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise BadRequest(f"shape {str(shape)[:80]}: a list of positive sizes")
    dims = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    if len(dims) != 3:
        raise BadRequest(f"shape {shape}: one image (1, H, W, 3) or (1, 3, H, W)")
    channels_first = dims[0] == 3 and dims[2] != 3
    height, width = (dims[1], dims[2]) if channels_first else (dims[0], dims[1])
    if (dims[0] if channels_first else dims[2]) != 3:
        raise BadRequest(f"shape {shape}: 3 channels (RGB)")
    if height > MAX_SIDE or width > MAX_SIDE:
        raise BadRequest(f"shape {shape}: over {MAX_SIDE} pixels a side")
    item = np.dtype(dtype)
    if len(data) != height * width * 3 * item.itemsize:
        raise BadRequest(
            f"{len(data)} bytes for shape {shape} {dtype} ({height * width * 3 * item.itemsize})"
        )
    array = np.frombuffer(data, dtype=item).reshape(dims)
    if channels_first:
        array = array.transpose(1, 2, 0)
    if item == np.uint8:
        return np.ascontiguousarray(array)
    if not np.isfinite(array).all():
        raise BadRequest("the tensor holds NaN or infinity")
    scale = 255.0 if float(array.max(initial=0.0)) <= 1.0 else 1.0
    return np.ascontiguousarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8))


def rows(detections: list[Any], ids: np.ndarray) -> bytes:
    """A detection result's boxes (best first) -> the (20, 6) float32 answer, in Frigate's class ids;
    classes its labelmap lacks are left out."""
    out = np.zeros((ROWS, 6), np.float32)
    n = 0
    for found in sorted(detections, key=lambda d: -d.score):
        class_id = int(ids[found.index]) if 0 <= found.index < len(ids) else -1
        if class_id < 0:
            continue
        box = found.box
        out[n] = (class_id, found.score, box.y_min, box.x_min, box.y_max, box.x_max)
        n += 1
        if n == ROWS:
            break
    return out.tobytes()


def reply(doc: dict[str, bool]) -> bytes:
    return json.dumps(doc).encode()

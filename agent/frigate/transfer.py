"""A model Frigate sends (its model transfer): checked, installed into the repository, then placed.

Frigate sends the file its `model.path` names when the agent has no model of that name. The agent
serves it when it can read it: an ONNX file with one image input (NHWC or NCHW, uint8 or float32)
and one output in a layout it decodes (agent/frames/detection.py): "ssd", (1, 1, N, 7) as OpenVINO's
DetectionOutput, or "yolo", (1, 4 + classes, N) as YOLOv8 and later exports (Frigate's `ssd` and
`yologeneric` model types). A model made for Frigate answers in Frigate's class ids, so its labels
are the names of the labelmap the agent answers in. It becomes repository model
`frigate-<file stem>`, one version per distinct file, verified in a staging folder and renamed into
place as a delivered version is (docs/fleet.md); the daemon then places it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from dataclasses import dataclass

from agent.protocol.topics import valid_model_name
from agent.service.model_repo import ModelError, ModelRepository, install_staged

PREFIX = "frigate-"
FLOAT_SCALE = 255.0  # a float input takes 0..1 (Frigate's `input_dtype: float`)


class TransferRefused(ValueError):
    """The file cannot be served; the message says why (logged, and answered model_loaded false)."""


@dataclass(frozen=True)
class Described:
    decoder: str  # "ssd" or "yolo"
    layout: str  # "NHWC" or "NCHW"
    size: tuple[int, int]  # (height, width)
    dtype: str  # "uint8" or "float32"
    classes: int  # output classes ("yolo"); for "ssd", the labelmap decides


def repo_name(model_name: str) -> str:
    """Frigate's file name -> the repository model serving it (`yolov9-t.onnx` -> `frigate-yolov9-t`)."""
    stem = model_name.rsplit(".", 1)[0] if "." in model_name[1:] else model_name
    name = PREFIX + re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")[: 64 - len(PREFIX)]
    if not valid_model_name(name) or name == PREFIX:
        raise TransferRefused(f"no repository name can be made from {model_name!r}")
    return name.rstrip("-.")


def describe(data: bytes) -> Described:
    """What the file is, read by ONNX Runtime from its graph (no inference run)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise TransferRefused(
            "ONNX Runtime is not installed (pip install 'edge-agent[onnxruntime]')"
        ) from exc
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for every malformed file
        raise TransferRefused(f"not an ONNX model ONNX Runtime can load: {str(exc)[:200]}") from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise TransferRefused(
            f"{len(inputs)} inputs and {len(outputs)} outputs; served: one image input and one output"
        )
    shape = [d if isinstance(d, int) else -1 for d in inputs[0].shape]
    dtype = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}.get(inputs[0].type)
    if dtype is None or len(shape) != 4 or shape[0] not in (1, -1):
        raise TransferRefused(f"input {inputs[0].shape} {inputs[0].type}: one image, uint8 or float32")
    if shape[3] == 3 and min(shape[1:3]) > 0:
        layout, size = "NHWC", (shape[1], shape[2])
    elif shape[1] == 3 and min(shape[2:4]) > 0:
        layout, size = "NCHW", (shape[2], shape[3])
    else:
        raise TransferRefused(f"input {inputs[0].shape}: (1, H, W, 3) or (1, 3, H, W) with a fixed size")
    out = [d if isinstance(d, int) else -1 for d in outputs[0].shape]
    if len(out) == 4 and out[1] == 1 and out[3] == 7:
        return Described("ssd", layout, size, dtype, 0)
    # YOLO heads predict at least one box per 32x32 cell (YOLOv8 at 320x320: 2,100 boxes); fewer
    # rows are a graph that decoded its own boxes, which this guess must not take for YOLO.
    if len(out) == 3 and min(out[1:]) >= 5 and max(out[1:]) >= size[0] * size[1] // 1024:
        return Described("yolo", layout, size, dtype, min(out[1:]) - 4)
    raise TransferRefused(
        f"output {outputs[0].shape}: served are ssd (1, 1, N, 7) and yologeneric (1, 4 + classes, N "
        "boxes, N at least one per 32x32 pixels of input)"
    )


def manifest_text(name: str, version: str, found: Described, digest: str, source: str) -> str:
    float_input = found.dtype == "float32"
    ssd = found.decoder == "ssd"
    scale = FLOAT_SCALE if float_input else 1.0
    return f"""# Written by the agent from a model Frigate sent ({source}).
name = "{name}"
version = "{version}"
task = "detection"
labels = "labels.txt"
source = "Frigate model transfer: {source}"

[input]
layout = "{found.layout}"
size = [{found.size[0]}, {found.size[1]}]
dtype = "{found.dtype}"
mean = [0.0, 0.0, 0.0]
std = [{scale}, {scale}, {scale}]
resize = "stretch"

[detection]
decoder = "{found.decoder}"
coordinates = "{"normalized" if ssd else "input_pixels"}"
score_threshold = 0.4
max_detections = 20
nms_iou = {0.6 if ssd else 0.4}
class_agnostic_nms = true

[artifacts.onnx]
file = "model.onnx"
sha256 = "{digest}"
"""


def install(repo: ModelRepository, model_name: str, data: bytes, labelmap: dict[int, str]) -> tuple[str, str]:
    """Install Frigate's file as a version of `frigate-<stem>` -> (name, version). The same bytes
    again are the version already installed; otherwise a new version, named by the time, so that the
    newest file is the newest version. Blocking (hashing, ONNX Runtime, disk)."""
    root = repo.versions_root
    if root is None:
        raise TransferRefused("this agent has no folder for installed model versions")
    name = repo_name(model_name)
    digest = hashlib.sha256(data).hexdigest()
    for version in repo.versions(name):
        try:
            _, manifest = repo.manifest(name, version)
        except ModelError:
            continue
        if any(spec.sha256 == digest for spec in manifest.artifacts.values()):
            return name, version
    found = describe(data)
    labels = found.classes or (max(labelmap) + 1 if labelmap else 0)
    version = time.strftime("%Y%m%d.%H%M%S", time.gmtime()) + f".{digest[:8]}"
    incoming = root / ".incoming" / f"{name}@{version}"
    folder = incoming / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(data)
        names = [labelmap.get(i, f"class{i}").replace(" ", "_") for i in range(labels)]
        (folder / "labels.txt").write_text("\n".join(names) + "\n")
        (folder / "model.toml").write_text(manifest_text(name, version, found, digest, model_name))
        install_staged(incoming, root, name, version)
    except ModelError as exc:
        raise TransferRefused(f"written, but not a valid model: {exc}") from exc
    except OSError as exc:
        raise TransferRefused(f"cannot install into {root / name}: {exc}") from exc
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return name, version

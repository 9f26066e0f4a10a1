"""A model Frigate sends is installed and served (docs/frigate.md#models-frigate-sends).

The models sent are the bundled COCO detector's real network with its output rewritten, in ONNX, into
the two layouts Frigate's own detectors read: "ssd" (1, 1, N, 7, OpenVINO's DetectionOutput) with a
uint8 NHWC input, and "yologeneric" (1, 4 + classes, N boxes, YOLOv8's head) with a float 0..1 NCHW
input, both answering in Frigate's default labelmap ids, as a model made for Frigate does. The agent
knows neither file: it must read the layout from the graph, install, place, and decode it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.frames.detection import as_rows
from agent.frigate import labelmap
from tests.conftest import wait_for_log
from tests.test_frigate import DOG, PERSON, ROOT, FrigateDetector, found, frigate_tensor

onnx = pytest.importorskip("onnx")
pytest.importorskip("zmq")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SOURCE = ROOT / "models" / "mb3-centernet"
TIMEOUT_MS = 10_000  # a newly placed model's first answers may be slow on a busy machine
SIDE = 512  # the network's input side; its rows are x1, y1, x2, y2 (pixels), score, class (COCO 80)


def _frigate_ids() -> np.ndarray:
    labels = tuple((SOURCE / "labels.txt").read_text().split())
    ids, missing = labelmap.class_ids(labels, labelmap.load("coco91"))
    assert not missing
    return ids


def _variant(layout: str) -> bytes:
    """The bundled network with Frigate-style input and output (see the module's docstring)."""
    model = onnx.load(str(SOURCE / "model.onnx"))
    graph = model.graph
    old_in, old_out = graph.input[0].name, graph.output[0].name
    const = [
        numpy_helper.from_array(_frigate_ids().astype(np.int64), "ids91"),
        numpy_helper.from_array(np.array([255.0], np.float32), "k255"),
        numpy_helper.from_array(np.array([float(SIDE)] * 4, np.float32), "side4"),
        numpy_helper.from_array(np.array([0, 0, 0, 4, 4, 5], np.int64), "starts"),
        numpy_helper.from_array(np.array([1, 100, 4, 5, 5, 6], np.int64), "unused"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([4], np.int64), "s4"),
        numpy_helper.from_array(np.array([5], np.int64), "s5"),
        numpy_helper.from_array(np.array([6], np.int64), "s6"),
        numpy_helper.from_array(np.array([2], np.int64), "ax2"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([91], np.int64), "depth"),
        numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "onoff"),
        numpy_helper.from_array(
            np.array([[0.5, 0, -1, 0], [0, 0.5, 0, -1], [0.5, 0, 1, 0], [0, 0.5, 0, 1]], np.float32),
            "to_cxcywh",
        ),
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 5376 - 100], np.int64), "pads"),
    ]
    graph.initializer.extend(const)
    del graph.input[0]
    del graph.output[0]
    head: list = []
    if layout == "ssd":  # uint8 NHWC in
        graph.input.append(helper.make_tensor_value_info("image", TensorProto.UINT8, [1, SIDE, SIDE, 3]))
        head.append(helper.make_node("Cast", ["image"], [old_in], to=TensorProto.FLOAT))
    else:  # float 0..1 NCHW in
        graph.input.append(helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIDE, SIDE]))
        head += [
            helper.make_node("Transpose", ["images"], ["nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("Mul", ["nhwc", "k255"], [old_in]),
        ]
    tail = [
        helper.make_node("Slice", [old_out, "s0", "s4", "ax2"], ["xyxy"]),
        helper.make_node("Slice", [old_out, "s4", "s5", "ax2"], ["score"]),
        helper.make_node("Slice", [old_out, "s5", "s6", "ax2"], ["cls80"]),
        helper.make_node("Cast", ["cls80"], ["cls80i"], to=TensorProto.INT64),
        helper.make_node("Gather", ["ids91", "cls80i"], ["cls91"]),
    ]
    if layout == "ssd":
        tail += [
            helper.make_node("Cast", ["cls91"], ["cls91f"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["xyxy", "side4"], ["norm"]),
            helper.make_node("Sub", ["score", "score"], ["image_id"]),
            helper.make_node("Concat", ["image_id", "cls91f", "score", "norm"], ["rows7"], axis=2),
            helper.make_node("Unsqueeze", ["rows7", "ax1"], ["detection_out"]),
        ]
        out = helper.make_tensor_value_info("detection_out", TensorProto.FLOAT, [1, 1, 100, 7])
    else:
        tail += [
            helper.make_node("MatMul", ["xyxy", "to_cxcywh"], ["cxcywh"]),
            helper.make_node("OneHot", ["cls91", "depth", "onoff"], ["hot"], axis=-1),
            helper.make_node("Squeeze", ["hot", "ax2"], ["hot3"]),
            helper.make_node("Mul", ["hot3", "score"], ["scores"]),
            helper.make_node("Concat", ["cxcywh", "scores"], ["rows95"], axis=2),
            helper.make_node("Transpose", ["rows95"], ["cols"], perm=[0, 2, 1]),
            # 5,376 boxes, as YOLOv8's head has at 512x512; the rest are zero.
            helper.make_node("Pad", ["cols", "pads"], ["output0"]),
        ]
        out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 95, 5376])
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.output.append(out)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def sent_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("frigate-models")
    out = {}
    for layout, name in (("ssd", "ssd-coco.onnx"), ("yolo", "yolov9-coco.onnx")):
        out[layout] = folder / name
        out[layout].write_bytes(_variant(layout))
    return out


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/frigate/zmq_detector"


def config(endpoint: str) -> str:
    return f"""
[placement]
generation = 1
[[placement.tenants]]
model = "efficientnet-lite0"
backend = "onnxruntime"
device = "cpu"

[frigate]
enabled = true
endpoints = ["{endpoint}"]
request_timeout_ms = {TIMEOUT_MS}
"""


def test_ssd_and_yolo_layouts_become_rows() -> None:
    ssd = np.zeros((1, 3, 7), np.float32)
    ssd[0, 0] = [0, 17, 0.9, 0.1, 0.2, 0.3, 0.4]
    ssd[0, 1] = [-1, 0, 0, 0, 0, 0, 0]  # the end of the list: what follows is not read
    ssd[0, 2] = [0, 1, 0.8, 0.5, 0.5, 0.6, 0.6]
    rows = as_rows(ssd, "ssd")
    assert rows.shape == (1, 6) and rows[0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.9, 17])
    yolo = np.zeros((4 + 3, 300), np.float32)  # (4 + classes, boxes)
    yolo[:, 7] = [100, 50, 20, 10, 0.1, 0.0, 0.7]
    rows = as_rows(yolo, "yolo")
    assert rows.shape == (300, 6)
    assert rows[7].tolist() == pytest.approx([90, 45, 110, 55, 0.7, 2])
    assert as_rows(yolo.T, "yolo")[7].tolist() == pytest.approx(rows[7].tolist())  # (boxes, 4 + classes)


def test_models_frigate_sends_are_served_or_refused_with_the_reason(
    agent_factory, endpoint, sent_models, tmp_path
):
    agent = agent_factory("frigx", config(endpoint)).start()
    agent.wait_ready()
    photo = frigate_tensor("detection/person.jpg")
    for layout, model_type in (("ssd", "ssd"), ("yolo", "yologeneric")):
        detector = FrigateDetector(endpoint, sent_models[layout], TIMEOUT_MS, model_type)
        try:
            assert detector.handshake == {"model_available": False, "model_loaded": False}
            assert detector.transfer == {"model_saved": True, "model_loaded": True}, layout
            rows = detector.detect_raw(photo)
            assert {PERSON, DOG} <= found(rows), (layout, rows[:4])
            person = rows[rows[:, 0] == PERSON][0]
            assert person[4] - person[2] > 0.4  # y_max - y_min: she stands over most of the photo
        finally:
            detector.close()
    # Both placed beside the classifier, which kept serving; a new Frigate socket finds them at once.
    status = agent.wait_ready()
    serving = {t["model"] for t in status["placement"]["tenants"]}
    assert serving == {"efficientnet-lite0", "frigate-ssd-coco", "frigate-yolov9-coco"}
    again = FrigateDetector(endpoint, sent_models["yolo"], TIMEOUT_MS, "yologeneric")
    try:
        assert again.handshake == {"model_available": True, "model_loaded": True}
    finally:
        again.close()

    # What it cannot decode is saved, refused with the reason, and changes nothing that serves.
    classifier = tmp_path / "classifier.onnx"  # one output (1, 1000): neither layout
    classifier.write_bytes((ROOT / "models" / "efficientnet-lite0" / "model.onnx").read_bytes())
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all" * 100)
    for path, why in ((classifier, "served are ssd"), (garbage, "not an ONNX model")):
        detector = FrigateDetector(endpoint, path, TIMEOUT_MS, "yologeneric")
        try:
            assert detector.transfer == {"model_saved": True, "model_loaded": False}
            wait_for_log(agent, why)
        finally:
            detector.close()
    assert {t["model"] for t in agent.wait_ready()["placement"]["tenants"]} == serving

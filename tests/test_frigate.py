"""edge-agent as Frigate's `zmq` detector (docs/frigate.md), driven by a client that speaks Frigate's
protocol exactly as frigate/detectors/plugins/zmq_ipc.py does: a REQ socket with send and receive
timeouts and linger 0, the model handshake (30 s for its answer), the model file sent when the agent
does not have it, and on a timeout zero rows, a new socket and the handshake again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.conftest import SAMPLES, wait_for_log

zmq = pytest.importorskip("zmq")

MODEL = "mb3-centernet"
ROOT = Path(__file__).resolve().parent.parent
PERSON, DOG = 0, 17  # in Frigate's default labelmap.txt
# Frigate's default is 200 ms; this shared test machine gets longer, so that only the timeouts a test
# makes happen (the agent is told the same: a request past it is not run).
TIMEOUT_MS = 3000


class FrigateDetector:
    """What Frigate's ZmqIpcDetector does, step for step (no Frigate code: its protocol)."""

    def __init__(
        self, endpoint: str, model_path: Path, timeout_ms: int = TIMEOUT_MS, model_type: str = "ssd"
    ) -> None:
        self.context = zmq.Context()
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.model_path = model_path
        self.model_name = model_path.name
        self.model_type = model_type
        self.socket: Any = None
        self.rebuilt = 0
        self.create_socket()
        self.model_ready = False
        self.initialize_model()

    def create_socket(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.rebuilt += 1
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        self.socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.endpoint)

    def initialize_model(self) -> None:
        if self.check_and_transfer_model():
            self.model_ready = True

    def _ask(self, frames: list[bytes]) -> dict[str, Any]:
        self.socket.send_multipart(frames)
        self.socket.setsockopt(zmq.RCVTIMEO, 30000)  # model operations get 30 s
        try:
            reply = self.socket.recv_multipart()
        finally:
            self.socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        assert len(reply) == 1
        return json.loads(reply[0])

    def check_and_transfer_model(self) -> bool:
        self.handshake = self._ask(
            [json.dumps({"model_request": True, "model_name": self.model_name}).encode()]
        )
        if self.handshake.get("model_available") and self.handshake.get("model_loaded"):
            return True
        if self.handshake.get("model_available"):
            return False
        self.transfer = self._ask(
            [
                json.dumps({"model_data": True, "model_name": self.model_name}).encode(),
                self.model_path.read_bytes(),
            ]
        )
        return bool(self.transfer.get("model_saved") and self.transfer.get("model_loaded"))

    def detect_raw(self, tensor: np.ndarray) -> np.ndarray:
        zero = np.zeros((20, 6), np.float32)
        if not self.model_ready:
            return zero
        header = {"shape": list(tensor.shape), "dtype": tensor.dtype.name, "model_type": self.model_type}
        try:
            self.socket.send_multipart([json.dumps(header).encode(), memoryview(tensor.tobytes(order="C"))])
            reply = self.socket.recv_multipart()
        except zmq.Again:
            self.create_socket()
            self.initialize_model()
            return zero
        if len(reply) == 1:
            if len(reply[0]) != 20 * 6 * 4:
                return zero
            return np.frombuffer(reply[0], dtype=np.float32).reshape((20, 6))
        head = json.loads(reply[0])
        return np.frombuffer(reply[1], dtype=np.dtype(head.get("dtype", "float32"))).reshape(head["shape"])

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def frigate_tensor(name: str, size: int = 320) -> np.ndarray:
    """A photo as Frigate hands a region to its detector: RGB uint8, 1 x size x size x 3 (NHWC)."""
    bgr = cv2.imread(str(SAMPLES / name))
    rgb = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(rgb[None])


def config(endpoint: str, faults: str = "") -> str:
    return f"""
faults = "{faults}"
[placement]
generation = 1
[[placement.tenants]]
model = "{MODEL}"
backend = "onnxruntime"
device = "cpu"

[frigate]
enabled = true
endpoints = ["{endpoint}"]
request_timeout_ms = {TIMEOUT_MS}
[frigate.models]
"mobiledet.onnx" = "{MODEL}"
"""


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/frigate/zmq_detector"


def found(rows: np.ndarray, min_score: float = 0.3) -> set[int]:
    """The class ids Frigate takes from an answer: rows in order until the score drops below."""
    out = set()
    for class_id, score, *_ in rows:
        if score < min_score:
            break
        out.add(int(class_id))
    return out


def test_frigate_finds_the_person_and_her_dog_with_its_own_class_ids(agent_factory, collector, endpoint):
    agent = agent_factory("frig1", config(endpoint)).start()
    agent.wait_ready()
    detector = FrigateDetector(endpoint, Path("/config/model_cache/mobiledet.onnx"))
    try:
        assert detector.handshake == {"model_available": True, "model_loaded": True}
        assert detector.model_ready
        telemetry = collector(["edge/frig1/telemetry"])
        rows = detector.detect_raw(frigate_tensor("detection/person.jpg"))
        assert rows.shape == (20, 6) and rows.dtype == np.float32
        assert {PERSON, DOG} <= found(rows)
        scores = rows[:, 1]
        assert list(scores) == sorted(scores, reverse=True)  # Frigate stops at the first low score
        used = rows[scores > 0]
        assert ((used[:, 2:] >= 0) & (used[:, 2:] <= 1)).all()
        assert (used[:, 4] > used[:, 2]).all() and (used[:, 5] > used[:, 3]).all()  # y_max > y_min
        assert not rows[scores == 0].any()  # unused rows are zero
        person = used[used[:, 0] == PERSON][0]
        assert person[4] - person[2] > 0.4  # she stands over most of the photo's height
        # A grey region: nothing. NCHW float 0..1 (Frigate's input_tensor nchw, input_dtype float).
        grey = np.full((1, 3, 320, 320), 0.5, np.float32)
        assert not found(detector.detect_raw(grey))
        # Counted per model like MQTT frames (telemetry, Prometheus, the console).
        tenants = telemetry.wait_for(
            lambda m: any(t["frames_out"] >= 2 for x in m for t in x["tenants"]), "edge/frig1/telemetry", 30
        )[-1]["tenants"]
        assert next(t for t in tenants if t["model"] == MODEL)["frames_in"] >= 2
    finally:
        detector.close()


def test_a_model_frigate_sends_is_saved_and_refused_with_a_reason(agent_factory, endpoint, tmp_path):
    agent = agent_factory("frig2", config(endpoint)).start()
    agent.wait_ready()
    own = tmp_path / "yolov9-t.onnx"
    own.write_bytes((ROOT / "models" / MODEL / "model.onnx").read_bytes())
    detector = FrigateDetector(endpoint, own, model_type="yologeneric")
    try:
        assert detector.handshake == {"model_available": False, "model_loaded": False}
        assert detector.transfer == {"model_saved": True, "model_loaded": False}
        assert not detector.model_ready
        assert (agent.state_dir / "frigate-models" / "yolov9-t.onnx").read_bytes() == own.read_bytes()
        wait_for_log(agent, "Frigate sent model 'yolov9-t.onnx'")
    finally:
        detector.close()


def test_a_timeout_rebuilds_the_socket_and_repeats_the_handshake(agent_factory, endpoint):
    # The second inference call takes 8 s longer: the client's timeout passes.
    agent = agent_factory("frig3", config(endpoint, "onnxruntime:cpu:slow:after=1:count=1:ms=8000")).start()
    agent.wait_ready()
    detector = FrigateDetector(endpoint, Path("mobiledet.onnx"))
    try:
        tensor = frigate_tensor("detection/person.jpg")
        assert PERSON in found(detector.detect_raw(tensor))
        assert not detector.detect_raw(tensor).any()  # timed out: zero rows
        assert detector.rebuilt == 1 and detector.model_ready
        assert detector.handshake == {"model_available": True, "model_loaded": True}  # on the new socket
        # Queued behind the slow call past its timeout: not run, and this client timed out again.
        assert not detector.detect_raw(tensor).any()
        assert detector.rebuilt == 2
        wait_for_log(agent, "expired")
        assert PERSON in found(detector.detect_raw(tensor))  # served again on the third socket
    finally:
        detector.close()


def test_after_an_agent_restart_frigate_repeats_the_handshake_through_its_timeout(agent_factory, endpoint):
    """With two models mapped, a socket the restarted agent has no handshake from is not answered:
    Frigate's timeout rebuilds it and repeats the handshake, and the next request is served."""
    two = config(endpoint) + '"other.onnx" = "efficientnet-lite0"\n'
    agent = agent_factory("frig5", two).start()
    agent.wait_ready()
    detector = FrigateDetector(endpoint, Path("mobiledet.onnx"))
    try:
        tensor = frigate_tensor("detection/person.jpg")
        assert PERSON in found(detector.detect_raw(tensor))
        agent.stop()
        agent.start()
        agent.wait_ready()
        assert not detector.detect_raw(tensor).any()  # the same socket, reconnected: no answer
        assert detector.rebuilt == 1 and detector.model_ready
        wait_for_log(agent, "made no handshake")
        assert PERSON in found(detector.detect_raw(tensor))
    finally:
        detector.close()


def test_bad_requests_get_zero_rows_and_a_log_line_never_a_stuck_socket(agent_factory, endpoint):
    agent = agent_factory("frig4", config(endpoint)).start()
    agent.wait_ready()
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 30000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)

    def ask(*frames: bytes) -> list[bytes]:
        sock.send_multipart(list(frames))
        return sock.recv_multipart()

    def header(**doc: Any) -> bytes:
        return json.dumps(doc).encode()

    zero = np.zeros((20, 6), np.float32).tobytes()
    good = frigate_tensor("detection/person.jpg")
    try:
        assert ask(b"{not json", b"x") == [zero]
        assert ask(header(shape=[1, 320, 320, 3], dtype="int64"), good.tobytes()) == [zero]
        assert ask(header(shape=[1, 320, 320, 3], dtype="uint8"), good.tobytes()[:-1]) == [zero]
        assert ask(header(shape=[1, 320, 320, 3, 1], dtype="uint8"), good.tobytes()) == [zero]
        assert ask(header(shape=[1, 9000, 9000, 3], dtype="uint8"), b"\0" * 64) == [zero]
        assert ask(header(shape=[1, 320, 320, 3], dtype="uint8")) == [zero]  # no tensor frame
        assert ask(header(model_request=True, model_name="../../etc/passwd")) == [zero]
        unknown = json.loads(ask(header(model_request=True, model_name="nothing-like-it.tflite"))[0])
        assert unknown == {"model_available": False, "model_loaded": False}
        log = wait_for_log(agent, "Frigate: bad request")
        assert "the first frame is not JSON" in log and "dtype 'int64'" in log
        # The same socket is still served: the one configured model answers without a handshake.
        rows = np.frombuffer(
            ask(header(shape=list(good.shape), dtype="uint8"), good.tobytes())[0], np.float32
        )
        assert PERSON in found(rows.reshape(20, 6))
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        sock.close(linger=0)
        context.term()


def test_labelmaps_frigate_ships_and_its_file_format(tmp_path):
    """Pure: the model's labels land on the ids of the labelmap Frigate is configured with."""
    from agent.frigate import labelmap

    labels = tuple((ROOT / "models" / MODEL / "labels.txt").read_text().split())
    ids, missing = labelmap.class_ids(labels, labelmap.load("coco91"))
    assert not missing
    assert ids[labels.index("person")] == PERSON and ids[labels.index("dog")] == DOG
    assert ids[labels.index("toothbrush")] == 89 and ids[labels.index("truck")] == 7
    assert list(labelmap.class_ids(labels, labelmap.load("coco80"))[0]) == list(range(80))
    own = tmp_path / "labelmap.txt"
    own.write_text("0  dog\n5  Person\n")  # Frigate's "<id>  <label>" lines
    ids, missing = labelmap.class_ids(labels, labelmap.load(str(own)))
    assert ids[labels.index("person")] == 5 and ids[labels.index("dog")] == 0
    assert "cat" in missing and ids[labels.index("cat")] == -1


def test_tensor_layouts_and_dtypes_frigate_sends_give_the_same_pixels():
    """Pure: NHWC uint8, NCHW uint8, float 0..1 and float_denorm 0..255 are one image to the agent."""
    from agent.frigate import wire

    rgb = frigate_tensor("detection/dog.jpg", 64)
    nchw = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))
    expected = rgb[0]
    for shape, dtype, data in [
        ([1, 64, 64, 3], "uint8", rgb.tobytes()),
        ([1, 3, 64, 64], "uint8", nchw.tobytes()),
        ([1, 64, 64, 3], "float32", (rgb.astype(np.float32) / 255).tobytes()),
        ([1, 3, 64, 64], "float32", nchw.astype(np.float32).tobytes()),
    ]:
        got = wire.pixels(shape, dtype, data)
        assert got.shape == (64, 64, 3) and np.abs(got.astype(int) - expected).max() <= 1

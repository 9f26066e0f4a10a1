"""Cascades (docs/detection.md "Cascades"): the bundled COCO detector's boxes classified by an
ImageNet classifier in one answer, on the real photos through the real models over a real broker;
the placement checks that refuse a cascade that cannot run; a deadline that passes mid-cascade.
"""

from __future__ import annotations

import asyncio
import io
import re

import numpy as np
import pytest
from PIL import Image

from agent.commands.client import publish_placement
from agent.frames.cascade import Job, chosen_boxes, crop
from agent.frames.ingest import Frame
from agent.placement.plan import check_cascades, describe_with
from agent.protocol.schemas import (
    Box,
    CascadeSpec,
    Detection,
    DetectionResult,
    ErrorInfo,
    ErrorResult,
    InferResult,
    Placement,
    TenantRef,
    Timing,
    TopK,
)
from agent.service.errors import PlacementRefused
from agent.service.model_repo import ModelRepository
from tests.conftest import MODELS, SAMPLES
from tests.test_backends import backend_or_skip
from tests.test_cli import edge_agent

DETECTOR = "mb3-centernet"
CLASSIFIER = "efficientnet-lite0"
DOG_BREEDS = range(151, 269)  # ImageNet-1k classes 151..268 are dog breeds


def _jpeg(path: str, scale: float = 1.0) -> bytes:
    image = Image.open(SAMPLES / "detection" / path).convert("RGB")
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue()


def _found(label: str, box: tuple[float, float, float, float]) -> Detection:
    return Detection(
        index=0, label=label, score=0.5, box=Box(x_min=box[0], y_min=box[1], x_max=box[2], y_max=box[3])
    )


# -- which boxes, cut from where --------------------------------------------------------------------
def test_boxes_are_chosen_by_label_size_in_frame_pixels_and_count() -> None:
    found = [
        _found("dog", (0.1, 0.1, 0.3, 0.3)),  # 200 x 100 px in a 1000 x 500 frame
        _found("person", (0.5, 0.1, 0.9, 0.9)),
        _found("dog", (0.0, 0.0, 0.05, 0.5)),  # 50 px wide
        _found("dog", (0.4, 0.4, 0.6, 0.9)),
    ]
    spec = CascadeSpec(after=DETECTOR, labels=["Dog"], min_box_px=60)
    assert chosen_boxes(found, spec, 1000, 500) == [0, 3]
    assert chosen_boxes(found, spec.model_copy(update={"max_crops": 1}), 1000, 500) == [0]
    # The same boxes in a frame a tenth the size are all under the minimum.
    assert chosen_boxes(found, spec, 100, 50) == []
    assert chosen_boxes(found, CascadeSpec(after=DETECTOR, min_box_px=1), 1000, 500) == [0, 1, 2, 3]


def test_a_crop_is_cut_from_the_full_frame_with_its_margin_and_kept_inside() -> None:
    frame = np.arange(400 * 600 * 3, dtype=np.uint32).reshape(400, 600, 3).astype(np.uint8)
    box = Box(x_min=0.5, y_min=0.25, x_max=0.75, y_max=0.5)  # 150 x 100 px at (300, 100)
    assert crop(frame, box, 0.0).shape == (100, 150, 3)
    assert np.array_equal(crop(frame, box, 0.0), frame[100:200, 300:450])
    assert crop(frame, box, 0.1).shape == (120, 180, 3)  # 10% of each side added on each side
    edge = Box(x_min=0.0, y_min=0.0, x_max=0.1, y_max=0.1)
    assert crop(frame, edge, 0.5).shape == (60, 90, 3)  # cut at the frame's edges


def _result(*labels: str) -> DetectionResult:
    return DetectionResult(
        request_id="f1",
        model=DETECTOR,
        tenant=TenantRef(backend="onnxruntime", device="cpu", instance=0),
        detections=[_found(label, (0.1, 0.1, 0.5, 0.5)) for label in labels],
        timing_ms=Timing(queue=0.0, preprocess=1.0, infer=2.0, total=3.0),
    )


def _top(label: str) -> InferResult:
    return InferResult(
        request_id="f1#0",
        model=CLASSIFIER,
        tenant=TenantRef(backend="onnxruntime", device="cpu", instance=0),
        top=[TopK(index=1, label=label, score=0.9)],
        timing_ms=Timing(queue=0.0, preprocess=1.0, infer=2.0, total=3.0),
    )


def test_a_frame_is_answered_once_whichever_comes_first() -> None:
    """The last crop answers the frame; a deadline after that, or a crop after the deadline, sends
    nothing more (exactly once); a crop the classifier found expired marks the frame timed_out."""
    sent: list[DetectionResult] = []
    frame = Frame(request_id="f1", model=DETECTOR, image=b"", received=0.0)
    spec = CascadeSpec(after=DETECTOR)
    job = Job(frame, _result("dog", "cat"), CLASSIFIER, spec, lambda _f, r: sent.append(r))
    job.expect(2)
    job.answer(0, _top("Cardigan"))
    assert sent == []
    job.answer(1, ErrorResult(request_id="f1#1", error=ErrorInfo(code="expired", message="late")))
    job.expire()
    assert len(sent) == 1 and sent[0].cascade is not None
    assert (sent[0].cascade.status, sent[0].cascade.classified) == ("timed_out", 1)
    assert sent[0].detections[0].classes == [TopK(index=1, label="Cardigan", score=0.9)]
    assert sent[0].detections[1].classes is None
    late = Job(frame, _result("dog"), CLASSIFIER, spec, lambda _f, r: sent.append(r))
    late.expect(1)
    late.expire()
    late.answer(0, _top("Cardigan"))
    assert len(sent) == 2 and sent[1].cascade is not None and sent[1].cascade.status == "timed_out"
    assert sent[1].detections[0].classes is None


# -- placement checks -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def describe():
    return describe_with(ModelRepository(MODELS))


def _placement(*tenants: dict) -> Placement:
    return Placement.model_validate({"generation": 1, "tenants": list(tenants)})


@pytest.mark.parametrize(
    ("tenants", "reason"),
    [
        ([{"model": CLASSIFIER, "cascade": {"after": DETECTOR}}], "which this placement does not run"),
        (
            [
                {"model": DETECTOR},
                {"model": CLASSIFIER, "cascade": {"after": DETECTOR, "labels": ["dog", "unicorn"]}},
            ],
            "labels ['unicorn'] of efficientnet-lite0 are not classes of the detector mb3-centernet",
        ),
        (
            [
                {"model": CLASSIFIER, "cascade": {"after": "efficientnet-lite1"}},
                {"model": "efficientnet-lite1", "cascade": {"after": CLASSIFIER}},
            ],
            "a cycle, efficientnet-lite0 -> efficientnet-lite1 -> efficientnet-lite0",
        ),
        (
            [{"model": CLASSIFIER, "cascade": {"after": CLASSIFIER}}],
            "a cycle, efficientnet-lite0 -> efficientnet-lite0",
        ),
        (
            [{"model": CLASSIFIER}, {"model": "efficientnet-lite1", "cascade": {"after": CLASSIFIER}}],
            "follows efficientnet-lite0, a classification model; a cascade follows a detector",
        ),
        (
            [{"model": CLASSIFIER}, {"model": DETECTOR, "cascade": {"after": CLASSIFIER}}],
            "mb3-centernet is a detection model; a cascade runs a classifier",
        ),
        (
            [
                {"model": DETECTOR},
                {"model": CLASSIFIER, "cascade": {"after": DETECTOR}},
                {"model": "efficientnet-lite1", "cascade": {"after": DETECTOR}},
            ],
            "both follow mb3-centernet; one classifier per detector",
        ),
    ],
)
def test_a_cascade_that_cannot_run_is_refused_with_the_reason(describe, tenants, reason) -> None:
    with pytest.raises(PlacementRefused, match="cascade: ") as refused:
        check_cascades(_placement(*tenants), describe)
    assert reason in str(refused.value)


def test_a_cascade_on_a_detector_passes(describe) -> None:
    check_cascades(
        _placement(
            {"model": DETECTOR}, {"model": CLASSIFIER, "cascade": {"after": DETECTOR, "labels": ["Dog"]}}
        ),
        describe,
    )


# -- over MQTT, the real models ---------------------------------------------------------------------
def _wait_tenants(collector, device: str, predicate, timeout: float = 120.0) -> dict:
    status = collector([f"edge/{device}/status"])
    return status.wait_for(
        lambda m: bool(m) and predicate(m[-1].get("placement") or {}), f"edge/{device}/status", timeout
    )[-1]


def _all_ready(placement: dict) -> bool:
    tenants = placement.get("tenants") or []
    return len(tenants) == 2 and all(t["state"] == "ready" for t in tenants)


def test_the_dog_gets_its_breed_in_one_answer(agent_factory, collector, broker) -> None:
    """person.jpg: one answer whose dog box carries a dog breed among the classifier's top 5; the
    same photo shrunk so that every box is under the minimum size: its boxes go out unclassified.
    A placement naming a label the detector lacks is refused first, with the reason in status."""
    agent = agent_factory("casc1").start()
    agent.wait_ready()
    bad = [
        {"model": DETECTOR},
        {"model": CLASSIFIER, "cascade": {"after": DETECTOR, "labels": ["dog", "dragon"]}},
    ]
    asyncio.run(publish_placement(broker.url, "casc1", {"generation": 1, "tenants": bad}))
    refused = _wait_tenants(collector, "casc1", lambda p: (p.get("refused") or {}).get("generation") == 1)
    assert (
        "['dragon'] of efficientnet-lite0 are not classes of the detector"
        in refused["placement"]["refused"]["reason"]
    )
    good = [
        {"model": DETECTOR},
        {
            "model": CLASSIFIER,
            "batch": {"max_size": 8},
            "cascade": {
                "after": DETECTOR,
                "labels": ["dog", "person", "sheep"],
                "min_box_px": 40,
                "top_k": 5,
            },
        },
    ]
    asyncio.run(publish_placement(broker.url, "casc1", {"generation": 2, "tenants": good}))
    _wait_tenants(collector, "casc1", _all_ready)
    c = collector(["edge/casc1/result"])
    c.publish(f"edge/casc1/infer/{DETECTOR}", _jpeg("person.jpg"))
    first = DetectionResult.model_validate(c.wait_for(lambda m: len(m) >= 1, "edge/casc1/result", 60)[0])
    assert first.cascade is not None and first.cascade.status == "complete", first.cascade
    assert first.cascade.model == CLASSIFIER and first.cascade.crops == first.cascade.classified >= 2
    dogs = [d for d in first.detections if d.label == "dog"]
    assert dogs and dogs[0].classes, first.detections
    assert any(top.index in DOG_BREEDS for top in dogs[0].classes), dogs[0].classes
    assert len(dogs[0].classes) == 5
    # `edge-agent infer` prints each box with its classes under the frame's line (its answer is the
    # second on the result topic).
    done = edge_agent(
        "infer",
        str(SAMPLES / "detection" / "person.jpg"),
        "--model",
        DETECTOR,
        "--broker",
        broker.url,
        "--device-id",
        "casc1",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    breed = dogs[0].classes[0].label
    assert re.search(
        rf"^ +dog +0\.\d{{3}} +x [\d.]+\.\.[\d.]+ y [\d.]+\.\.[\d.]+ +{re.escape(breed)} 0\.\d{{3}}",
        done.stdout,
        re.M,
    ), done.stdout
    # The same scene at a fifth of the size: the dog is ~17 px high, under the 40-px minimum.
    c.publish(f"edge/casc1/infer/{DETECTOR}", _jpeg("person.jpg", 0.2))
    small = DetectionResult.model_validate(c.wait_for(lambda m: len(m) >= 3, "edge/casc1/result", 60)[2])
    assert small.detections and all(d.classes is None for d in small.detections), small.detections
    assert small.cascade is not None and small.cascade.crops == 0
    # The classifier still answers frames of its own, as a tenant of its own.
    c.publish(f"edge/casc1/infer/{CLASSIFIER}", _jpeg("dog.jpg"))
    own = c.wait_for(lambda m: len(m) >= 4, "edge/casc1/result", 60)[3]
    assert own["model"] == CLASSIFIER and "top" in own
    # Duplicates and errors as for a single model: a request id sent again gets the same answer
    # (classes included) without running the cascade again; a frame that is no image, a coded error.
    for _ in range(2):
        c.client.publish(
            f"edge/casc1/infer/{DETECTOR}", _jpeg("person.jpg"), qos=1, properties=_correlation(b"again-1")
        ).wait_for_publish(10)
    again = [
        r
        for r in c.wait_for(
            lambda m: sum(r.get("request_id") == "again-1" for r in m) >= 2, "edge/casc1/result", 60
        )
        if r.get("request_id") == "again-1"
    ]
    assert again[0] == again[1] and again[0]["cascade"]["status"] == "complete", again
    c.client.publish(
        f"edge/casc1/infer/{DETECTOR}", b"not an image", qos=1, properties=_correlation(b"bad-1")
    ).wait_for_publish(10)
    bad = c.wait_for(lambda m: any(r.get("request_id") == "bad-1" for r in m), "edge/casc1/result", 60)
    assert [r["error"]["code"] for r in bad if r.get("request_id") == "bad-1"] == ["bad_image"]


def test_a_deadline_that_passes_mid_cascade_sends_the_boxes_unclassified_once(
    agent_factory, collector, broker
) -> None:
    """The classifier on another backend (OpenVINO) made slow by the agent's own fault injection:
    the frame's answer goes out at the cascade's deadline with its boxes, marked timed_out, and the
    late crops never make a second answer."""
    backend_or_skip("openvino", "CPU")
    agent = agent_factory("casc2", env={"EDGE_AGENT_FAULTS": "openvino:CPU:slow:ms=1500"}).start()
    agent.wait_ready()
    tenants = [
        {"model": DETECTOR, "backend": "onnxruntime"},
        {
            "model": CLASSIFIER,
            "backend": "openvino",
            "device": "CPU",
            "cascade": {"after": DETECTOR, "min_box_px": 20, "timeout_ms": 300},
        },
    ]
    asyncio.run(publish_placement(broker.url, "casc2", {"generation": 1, "tenants": tenants}))
    _wait_tenants(collector, "casc2", _all_ready, 180)
    c = collector(["edge/casc2/result"])
    c.client.publish(
        f"edge/casc2/infer/{DETECTOR}", _jpeg("person.jpg"), qos=1, properties=_correlation(b"late-1")
    ).wait_for_publish(10)
    answer = DetectionResult.model_validate(c.wait_for(lambda m: len(m) >= 1, "edge/casc2/result", 60)[0])
    assert answer.request_id == "late-1"
    assert answer.cascade is not None and answer.cascade.status == "timed_out", answer.cascade
    assert answer.cascade.classified == 0 and answer.cascade.crops >= 2
    assert {"person", "dog"} <= {d.label for d in answer.detections}
    assert all(d.classes is None for d in answer.detections)
    # The slow crops come back later; then a marker frame to the classifier itself: its answer
    # arriving after them shows no second answer for late-1 went out.
    c.publish(f"edge/casc2/infer/{CLASSIFIER}", _jpeg("dog.jpg"))
    results = c.wait_for(lambda m: any(r.get("model") == CLASSIFIER for r in m), "edge/casc2/result", 60)
    assert [r["request_id"] for r in results].count("late-1") == 1, results


def _correlation(data: bytes):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = data
    return props

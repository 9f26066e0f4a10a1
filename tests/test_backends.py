"""Backend conformance: every available runtime gives the same answers on the same real photos.

Parametrised per backend and device; skipped with the reason where a runtime or device is missing.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

from agent.frames.preprocess import Preprocessor
from agent.service.model_repo import ModelRepository
from backends import registry
from backends.base import BackendUnavailable, ModelLoadError, UnknownDevice
from tests.conftest import MODELS, SAMPLES

# (backend, device, precision): every runtime and device the agent supports; absent ones are skipped
# with the reason (runtime not installed, device not present, artifact not built).
CASES = [
    ("onnxruntime", "cpu", None),
    ("openvino", "CPU", "fp32"),
    ("openvino", "CPU", None),  # the runtime's default: bf16 on AMX CPUs
    ("tflite", "cpu", None),
    ("torch", "cpu", None),
    ("onnxruntime", "cuda:0", None),
    ("onnxruntime", "tensorrt:0", None),
    ("tensorrt", "cuda:0", "fp16"),
    ("torch", "cuda:0", "fp16"),
    ("openvino", "GPU", None),
    ("openvino", "NPU", None),
]
INT8_CASES = [("tflite", "cpu", "int8"), ("edgetpu", "usb:0", None), ("edgetpu", "pci:0", None)]


@pytest.fixture(scope="module")
def lite0():
    return ModelRepository(MODELS).load("efficientnet-lite0")


@pytest.fixture(scope="module")
def photos(lite0):
    pre = Preprocessor(lite0.input, 40_000_000)
    paths = sorted(SAMPLES.glob("*.jpg"))
    return [p.name for p in paths], np.stack([pre(p.read_bytes()) for p in paths])


@pytest.fixture(scope="module")
def reference(lite0, photos):
    """fp32 reference: plain ONNX Runtime on the CPU, batch of all photos."""
    session = ort.InferenceSession(str(lite0.artifacts.files["onnx"]), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": photos[1]})[0]


def _ov_capabilities(device: str) -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES"))


def backend_or_skip(name: str, device: str):
    backend = registry.get(name)
    ok, reason = backend.available()
    if not ok:
        pytest.skip(f"{name}: {reason}")
    try:
        return backend, backend.canonical_device(device)
    except UnknownDevice as exc:
        pytest.skip(str(exc))


def load_or_skip(backend, model, device: str, options: dict):
    try:
        return backend.load(model.artifacts, device, options)
    except ModelLoadError as exc:
        if "no " in str(exc) and "artifact" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.mark.parametrize(
    ("name", "device", "precision"), CASES, ids=[f"{n}-{d}-{p or 'fp32'}" for n, d, p in CASES]
)
def test_same_top1_as_fp32_reference(name, device, precision, lite0, photos, reference):
    backend, device = backend_or_skip(name, device)
    session = load_or_skip(backend, lite0, device, {"threads": 1, "precision": precision, "max_batch": 8})
    try:
        names, batch = photos
        got = session.infer(batch)
        assert got.shape == (len(names), 1000)
        half = precision == "fp16" or (
            name == "openvino" and precision is None and "BF16" in _ov_capabilities(device)
        )
        top1 = sum(int(g.argmax() == r.argmax()) for g, r in zip(got, reference, strict=True))
        # Reduced precision may swap two near-tied classes (the cat photo: Egyptian cat 0.40 vs
        # tiger cat 0.35); fp32 backends must agree on every photo.
        assert top1 >= (len(names) - 1 if half else len(names)), f"top-1 agreed on {top1}/{len(names)}"
        # OpenVINO runs bf16 by default on CPUs with AMX/AVX512-BF16 (this machine), fp16 runs on GPUs:
        # same top-1 and top-5, logits within half-precision rounding. fp32 must match closely.
        assert np.abs(got - reference).max() < (0.5 if half else 1e-2)
        for g, r in zip(got, reference, strict=True):
            assert len(set(np.argsort(-g)[:5]) & set(np.argsort(-r)[:5])) >= 4
        # Batch of one gives the same answer as the batch.
        single = session.infer(batch[:1])
        assert single.argmax() == got[0].argmax()
        # Label mapping: the espresso photo is "espresso".
        assert lite0.labels[int(got[names.index("espresso.jpg")].argmax())] == "espresso"
    finally:
        session.close()


@pytest.mark.parametrize(
    ("name", "device", "precision"), INT8_CASES, ids=[f"{n}-{d}-{p or 'int8'}" for n, d, p in INT8_CASES]
)
def test_int8_agrees_with_fp32_on_most_photos(name, device, precision, lite0, photos, reference):
    backend, device = backend_or_skip(name, device)
    session = load_or_skip(backend, lite0, device, {"threads": 1, "precision": precision})
    try:
        names, batch = photos
        got = session.infer(batch)
        assert got.shape == (len(names), 1000)
        agree = sum(int(g.argmax() == r.argmax()) for g, r in zip(got, reference, strict=True))
        assert agree >= len(names) - 1, f"int8 top-1 agreed on {agree}/{len(names)} photos"
        overlaps = [
            len(set(np.argsort(-g)[:5]) & set(np.argsort(-r)[:5]))
            for g, r in zip(got, reference, strict=True)
        ]
        assert min(overlaps) >= 2 and sum(overlaps) / len(overlaps) >= 3, overlaps
    finally:
        session.close()


@pytest.mark.parametrize(
    ("name", "device"), [c[:2] for c in CASES[:3]], ids=[f"{n}-{d}" for n, d, _ in CASES[:3]]
)
def test_instances_are_thread_safe(name, device, lite0, photos, reference):
    backend, device = backend_or_skip(name, device)
    options = {"threads": 1, "instances": 2, "precision": "fp32"}
    sessions = [load_or_skip(backend, lite0, device, options) for _ in range(2)]
    errors: list[str] = []

    def hammer(session) -> None:
        for _ in range(10):
            got = session.infer(photos[1])
            if list(got.argmax(1)) != list(reference.argmax(1)):
                errors.append("mismatch")

    threads = [threading.Thread(target=hammer, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sessions:
        s.close()
    assert not errors


def test_unknown_backend_and_device_are_clear_errors(lite0):
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        registry.get("tensorflow-9000")
    with pytest.raises(UnknownDevice, match="present"):
        registry.get("onnxruntime").load(lite0.artifacts, "tpu:3", {})


def test_missing_artifact_format_is_a_load_error(lite0):
    from dataclasses import replace

    no_onnx = replace(lite0.artifacts, files={})
    with pytest.raises(ModelLoadError, match="no artifact"):
        registry.get("onnxruntime").load(no_onnx, "cpu", {})


def test_capabilities_never_raise_and_list_cpu():
    caps = registry.capabilities()
    assert caps["onnxruntime"][0] is True and "cpu" in caps["onnxruntime"][1]
    assert "fake" not in caps, "the test double is not offered to users"
    for ok, _devices, reason in caps.values():
        assert ok or reason


def test_device_names_case_insensitive_and_kind_alone_means_the_first():
    from backends.fake import FakeBackend

    class TwoGpus(FakeBackend):
        def devices(self) -> list[str]:
            return ["cpu", "cuda:0", "cuda:1", "GPU.0"]

    b = TwoGpus()
    assert b.canonical_device("CUDA") == "cuda:0"
    assert b.canonical_device("Cuda:1") == "cuda:1"
    assert b.canonical_device("gpu.0") == "GPU.0"
    with pytest.raises(UnknownDevice, match=r"present: cpu, cuda:0, cuda:1, GPU\.0"):
        b.canonical_device("cuda:7")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def test_onnxruntime_instances_of_one_model_hold_its_weights_once(lite0, photos, reference):
    """Four instances cost about one: lite0's optimised weights are 28 MB per copy in ONNX Runtime,
    so three more copies would add over 80 MB (docs/performance.md#memory)."""
    backend, device = backend_or_skip("onnxruntime", "cpu")
    options = {"threads": 1, "instances": 4, "precision": "fp32"}
    first = load_or_skip(backend, lite0, device, options)
    for _ in range(2):  # ONNX Runtime's arena grows over the first two runs of a batch size
        first.infer(photos[1])
    before = _rss_mb()
    more = [backend.load(lite0.artifacts, device, options) for _ in range(3)]
    for s in more:
        assert s.infer(photos[1]).argmax(1).tolist() == reference.argmax(1).tolist()
    grown = _rss_mb() - before
    for s in [first, *more]:
        s.close()
    assert grown < 20, f"{grown:.1f} MB for three more instances"
    again = backend.load(lite0.artifacts, device, options)  # after the last closed: a fresh one
    assert again.infer(photos[1]).argmax(1).tolist() == reference.argmax(1).tolist()
    again.close()

"""A user's own model: the mistakes people make are refused when the model loads, with a reason,
not discovered frame by frame. Real ONNX Runtime on variants of the bundled EfficientNet-Lite0."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

import pytest

from agent.frames.ingest import Frame
from agent.frames.tenant import Tenant
from agent.protocol.schemas import ErrorResult, InferResult, TenantSpec
from agent.service.model_repo import ModelError, ModelRepository
from backends import registry
from backends.base import BackendError
from tests.conftest import MODELS, sample

ESPRESSO = 967


@pytest.fixture
def own(tmp_path) -> Path:
    """A repository holding a copy of lite0 under the user's own name, ONNX only."""
    folder = tmp_path / "models" / "my-classifier"
    folder.mkdir(parents=True)
    for name in ("model.onnx", "labels.txt"):
        shutil.copy(MODELS / "efficientnet-lite0" / name, folder / name)
    text = (MODELS / "efficientnet-lite0" / "model.toml").read_text()
    text = text.replace('name = "efficientnet-lite0"', 'name = "my-classifier"')
    keep = text.split("\n[artifacts.")[0]
    onnx_section = re.search(r"\n\[artifacts\.onnx\][^\[]*", text)
    assert onnx_section is not None
    (folder / "model.toml").write_text(keep + onnx_section.group(0))
    return folder


def load_tenant(folder: Path) -> tuple[Tenant, list]:
    model = ModelRepository(folder.parent).load(folder.name)
    outcomes: list = []
    tenant = Tenant(
        TenantSpec(model=folder.name, backend="onnxruntime", device="cpu"),
        model,
        registry.get("onnxruntime"),
        lambda frame, outcome: outcomes.append(outcome),
        queue_depth=8,
        overload_policy="drop_oldest",
        max_pixels=40_000_000,
    )
    tenant.load()
    return tenant, outcomes


def set_sha256(folder: Path, text_sha: str | None = None) -> None:
    digest = text_sha or hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    toml = folder / "model.toml"
    toml.write_text(re.sub(r'sha256 = "[0-9a-fA-F]{64}"', f'sha256 = "{digest}"', toml.read_text()))


def serve_one(folder: Path) -> InferResult | ErrorResult:
    tenant, outcomes = load_tenant(folder)
    tenant.start()
    tenant.submit(Frame("e", folder.name, sample("espresso.jpg"), time.monotonic()))
    deadline = time.monotonic() + 30
    while not outcomes and time.monotonic() < deadline:
        time.sleep(0.01)
    tenant.drain(5.0)
    return outcomes[0]


def test_the_copy_serves_under_its_own_name(own):
    result = serve_one(own)
    assert isinstance(result, InferResult) and result.top[0].index == ESPRESSO


def test_sha256_in_upper_case_is_accepted(own):
    set_sha256(own, hashlib.sha256((own / "model.onnx").read_bytes()).hexdigest().upper())
    ModelRepository(own.parent).load("my-classifier")


def test_labels_that_are_not_utf8_are_a_model_error_naming_the_file(own):
    (own / "labels.txt").write_bytes(b"caf\xe9\n" * 1000)
    with pytest.raises(ModelError, match=r"my-classifier.*labels file 'labels\.txt' unreadable"):
        ModelRepository(own.parent).load("my-classifier")


def test_labels_that_do_not_match_the_outputs_are_refused_at_load(own):
    (own / "labels.txt").write_text("\n".join(f"class {i}" for i in range(10)))
    with pytest.raises(BackendError, match=r"outputs 1000 classes but labels\.txt has 10 labels"):
        load_tenant(own)


def test_a_wrong_input_size_is_refused_at_load_with_a_hint(own):
    toml = own / "model.toml"
    toml.write_text(toml.read_text().replace("size = [224, 224]", "size = [256, 256]"))
    with pytest.raises(BackendError, match=r"(?s)warm-up at batch 1 failed.*check \[input\] size"):
        load_tenant(own)


def test_a_model_that_outputs_probabilities_in_4d_keeps_its_own_scores(own):
    """A softmax head (probabilities, not logits) shaped (N, C, 1, 1), as SqueezeNet-style heads
    are: served with the model's scores, not a softmax of them, and not an error per frame."""
    import onnx
    from onnx import helper

    path = own / "model.onnx"
    graph_model = onnx.load(path)
    graph = graph_model.graph
    logits = graph.output[0].name
    shape = helper.make_tensor("shape4d", onnx.TensorProto.INT64, [4], [-1, 1000, 1, 1])
    graph.initializer.append(shape)
    graph.node.extend(
        [
            helper.make_node("Softmax", [logits], ["probs"], axis=1),
            helper.make_node("Reshape", ["probs", "shape4d"], ["probs4d"]),
        ]
    )
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info("probs4d", onnx.TensorProto.FLOAT, ["batch", 1000, 1, 1])
    )
    onnx.save(graph_model, path)
    set_sha256(own)
    result = serve_one(own)
    assert not isinstance(result, ErrorResult), result
    # 0.949 as the logits model scores it; a softmax over these probabilities would give ~0.003.
    assert result.top[0].index == ESPRESSO and result.top[0].score > 0.9, result.top[:2]

"""Property-based tests (hypothesis) over every parser that takes outside input."""

from __future__ import annotations

import io
import json
import shutil
import tomllib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agent.frames.preprocess import BadImage, Preprocessor
from agent.protocol.signing import SignatureRefused, load_public_key, verify
from agent.protocol.topics import Topics, parse_device_topic
from agent.service.config import ConfigError, load_config, parse_broker_url
from agent.service.model_repo import ModelError, ModelRepository
from tests.conftest import MODELS, sample

SPEC = ModelRepository(MODELS).load("efficientnet-lite0").input
PRE = Preprocessor(SPEC, 4_000_000)


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """A real image with bytes flipped, cut or inserted: what a flaky camera link produces."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            kind = draw(st.sampled_from(["flip", "cut", "insert"]))
            pos = draw(st.integers(0, len(buf) - 1))
            if kind == "flip":
                buf[pos] = draw(st.integers(0, 255))
            elif kind == "cut":
                del buf[pos : pos + draw(st.integers(1, 4096))]
            else:
                buf[pos:pos] = draw(st.binary(min_size=1, max_size=64))
            if not buf:
                break
        return bytes(buf)

    return build()


SMALL_PNG = io.BytesIO()
Image.open(io.BytesIO(sample("cat.jpg"))).resize((96, 64)).save(SMALL_PNG, "PNG")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_mutations(sample("cat.jpg")), _mutations(SMALL_PNG.getvalue()), st.binary(max_size=4096)))
def test_decoder_returns_a_tensor_or_bad_image_never_anything_else(data):
    try:
        out = PRE(data)
    except BadImage as exc:
        assert str(exc)
        return
    assert out.shape == (3, 224, 224)


toml_values = st.recursive(
    st.booleans() | st.integers(-(2**31), 2**31) | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=12), inner, max_size=3)
    ),
    max_leaves=12,
)
KEYS = [
    "device_id",
    "state_dir",
    "broker",
    "ingest",
    "scheduler",
    "metrics",
    "placement",
    "security",
    "log_level",
    "x",
]


def _toml(doc: dict) -> str:
    def value(v):  # a tiny TOML writer for the shapes hypothesis makes
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"

    return "\n".join(f"{json.dumps(k)} = {value(v)}" for k, v in doc.items())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=4))
def test_config_loads_or_raises_config_error(tmp_path, doc):
    path = tmp_path / "agent.toml"
    text = _toml(doc)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # our tiny writer cannot express it; not the agent's concern
    path.write_text(text)
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert "invalid configuration" in str(exc) or "config file" in str(exc)
        return
    assert config.device_id


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_broker_url_parses_or_config_error(url):
    try:
        out = parse_broker_url(url)
    except ConfigError:
        return
    assert out["host"] and 1 <= out["port"] <= 65535


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(["name", "labels", "input", "artifacts", "task", "version", "evil"]),
        toml_values,
        max_size=6,
    )
)
def test_manifest_parses_or_model_error(tmp_path, doc):
    root = tmp_path / "models"
    folder = root / "m1"
    if root.exists():
        shutil.rmtree(root)
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps(doc))
    try:
        ModelRepository(root).load("m1")
    except ModelError as exc:
        assert str(exc)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["generation", "tenants", "signature", "signed_at", "expires_at"]),
        toml_values,
        max_size=5,
    )
)
def test_signature_check_refuses_anything_not_signed(doc):
    key = load_public_key("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
    try:
        verify(doc, key, max_age_s=60)
    except SignatureRefused:
        return
    raise AssertionError("an unsigned or random document verified")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc/+#$-_ 9", max_size=40))
def test_device_topic_parses_or_is_none(topic):
    """Any topic the console receives: (device id, kind) that rebuild the same topic, or None."""
    parsed = parse_device_topic(topic, "edge")
    if parsed is None:
        return
    device_id, kind = parsed
    assert f"edge/{device_id}/{kind}" == topic
    assert Topics(device_id, "edge").base == f"edge/{device_id}"


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"), st.sampled_from(["status", "telemetry", "placement"]))
def test_device_topics_built_are_parsed_back(device_id, kind):
    assert parse_device_topic(getattr(Topics(device_id, "fleet"), kind), "fleet") == (device_id, kind)

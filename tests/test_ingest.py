"""Frame parsing: model and request-id rules, envelopes, limits; and a property test over any input."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.frames.ingest import FrameMeta, IngestError, parse_frame
from agent.protocol.schemas import Placement

JPEG = b"\xff\xd8\xff\xe0fake-but-sniffable"


def parse(
    payload: bytes, meta: FrameMeta | None = None, topic_model: str | None = None, max_bytes: int = 1000
):
    return parse_frame(
        payload, meta or FrameMeta(), topic_model=topic_model, default_model="dflt", max_bytes=max_bytes
    )


def test_model_choice_order_topic_then_user_property_then_envelope_then_default():
    env = json.dumps({"model": "from-env", "image_b64": base64.b64encode(JPEG).decode()}).encode()
    meta = FrameMeta(user_properties={"model": "from-prop"})
    assert parse(env, meta, topic_model="from-topic").model == "from-topic"
    assert parse(env, meta).model == "from-prop"
    assert parse(env).model == "from-env"
    assert parse(JPEG).model == "dflt"


def test_request_id_order_and_generation():
    env = json.dumps({"request_id": "env-id", "image_b64": base64.b64encode(JPEG).decode()}).encode()
    assert parse(env, FrameMeta(correlation_data=b"corr")).request_id == "corr"
    assert parse(env, FrameMeta(user_properties={"request_id": "prop"})).request_id == "prop"
    assert parse(env).request_id == "env-id"
    a, b = parse(JPEG).request_id, parse(JPEG).request_id
    assert a != b and len(a) == 32
    assert parse(JPEG, FrameMeta(correlation_data=b"\xff\x00")).request_id == "ff00"


def test_expiry_becomes_a_deadline():
    frame = parse_frame(
        JPEG, FrameMeta(expiry_s=5), topic_model=None, default_model="m", max_bytes=100, now=10.0
    )
    assert frame.expires_at == 15.0
    unset = parse_frame(JPEG, FrameMeta(expiry_s=0), topic_model=None, default_model="m", max_bytes=100)
    assert unset.expires_at is None, "an expiry interval of 0 means no expiry"


@pytest.mark.parametrize(
    "envelope",
    [{"request_id": "r1"}, {"request_id": "r1", "model": "m1", "image_b64": "aGk=", "extra": 1}],
)
def test_a_bad_envelope_is_answered_with_the_callers_own_request_id(envelope):
    with pytest.raises(IngestError) as err:
        parse(json.dumps(envelope).encode())
    assert err.value.code == "bad_request" and err.value.request_id == "r1"
    assert err.value.model == envelope.get("model")


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", "bad_image"),
        (b"x" * 1001, "too_large"),
        (b'{"image_b64": 3}', "bad_request"),
        (b'{"image_b64": "a", "extra": 1}', "bad_request"),
        (b'{"image_b64": "!!!"}', "bad_request"),
        (b'{"image_b64": ""}', "bad_image"),
        (b"{" + b" " * 6000, "too_large"),
        (json.dumps({"model": "../x", "image_b64": "aGVsbG8="}).encode(), "unknown_model"),
        (json.dumps({"model": "/etc/passwd", "image_b64": "aGVsbG8="}).encode(), "unknown_model"),
    ],
)
def test_refusals_carry_a_code(payload, code):
    with pytest.raises(IngestError) as err:
        parse(payload)
    assert err.value.code == code
    assert err.value.request_id


@settings(max_examples=400, deadline=None)
@given(
    payload=st.binary(max_size=2000),
    corr=st.none() | st.binary(max_size=300),
    props=st.dictionaries(st.sampled_from(["model", "request_id", "other"]), st.text(max_size=100)),
    topic_model=st.none() | st.text(max_size=80),
)
def test_any_message_parses_or_is_refused_with_a_code(payload, corr, props, topic_model):
    try:
        frame = parse(payload, FrameMeta(correlation_data=corr, user_properties=props), topic_model)
    except IngestError as exc:
        assert exc.code in {"bad_image", "too_large", "bad_request", "unknown_model"}
        assert exc.request_id
        return
    assert frame.image and len(frame.image) <= 1000
    assert frame.request_id


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_envelope_parser_never_raises_anything_else(doc):
    try:
        parse(json.dumps({"image_b64": doc}).encode(), max_bytes=10_000)
    except IngestError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["generation", "tenants", "x"]),
        st.none()
        | st.integers()
        | st.text(max_size=10)
        | st.lists(
            st.dictionaries(
                st.sampled_from(["model", "backend", "device", "instances"]),
                st.integers(-5, 100) | st.text(max_size=20),
            ),
            max_size=3,
        ),
    )
)
def test_placement_parser_validates_or_raises_validation_error(doc):
    from pydantic import ValidationError

    try:
        placement = Placement.model_validate_json(json.dumps(doc))
    except ValidationError:
        return
    for tenant in placement.tenants:
        assert 1 <= tenant.instances <= 32
        assert ".." not in tenant.model and "/" not in tenant.model

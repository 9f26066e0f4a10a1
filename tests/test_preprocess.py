"""Decoding and preprocessing of real photos, and refusal of hostile images."""

from __future__ import annotations

import io
import sys

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from agent.frames.preprocess import BadImage, Preprocessor
from agent.service.model_repo import ModelRepository
from tests import badimages
from tests.conftest import MODELS, SAMPLES, sample

sys.path.insert(0, str(MODELS))
from build import reference_preprocess


@pytest.fixture(scope="module")
def lite0():
    return ModelRepository(MODELS).load("efficientnet-lite0")


@pytest.fixture(scope="module")
def session(lite0):
    return ort.InferenceSession(str(lite0.artifacts.files["onnx"]), providers=["CPUExecutionProvider"])


def test_fast_path_agrees_with_reference_on_real_photos(lite0, session):
    pre = Preprocessor(lite0.input, 40_000_000)
    for path in sorted(SAMPLES.glob("*.jpg")):
        fast = pre(path.read_bytes())[None]
        ref = reference_preprocess(Image.open(path), 224)
        assert fast.shape == ref.shape == (1, 3, 224, 224)
        a = session.run(None, {"input": fast})[0][0]
        b = session.run(None, {"input": ref})[0][0]
        assert a.argmax() == b.argmax(), path.name


def test_large_jpeg_decoded_at_reduced_scale_still_classifies(lite0, session):
    big = Image.open(SAMPLES / "espresso.jpg").resize((2400, 1600))
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    pre = Preprocessor(lite0.input, 40_000_000)
    decoded = pre.decode(buf.getvalue())
    assert decoded.shape[1] < 2400, "DCT scaling kicked in"
    assert min(decoded.shape[:2]) >= 224 / 0.875 * 0.99
    logits = session.run(None, {"input": pre(buf.getvalue())[None]})[0][0]
    assert lite0.labels[int(logits.argmax())] == "espresso"


def test_libjpeg_turbo_and_pillow_paths_agree_on_real_photos(lite0, session, monkeypatch):
    """The fast decoder (simplejpeg) and the fallback (Pillow) give the same top-1 on every photo."""
    import agent.frames.preprocess as preprocess

    assert preprocess.simplejpeg is not None, "simplejpeg is a core dependency"
    pre = Preprocessor(lite0.input, 40_000_000)
    photos = sorted(SAMPLES.glob("*.jpg"))
    fast = [session.run(None, {"input": pre(p.read_bytes())[None]})[0][0].argmax() for p in photos]
    monkeypatch.setattr(preprocess, "simplejpeg", None)
    slow = [session.run(None, {"input": pre(p.read_bytes())[None]})[0][0].argmax() for p in photos]
    assert fast == slow


@pytest.mark.parametrize("variant", ["grayscale", "cmyk", "progressive", "4:4:4"])
def test_jpeg_variants_decode_and_classify(lite0, session, variant):
    image = Image.open(SAMPLES / "espresso.jpg")
    buf = io.BytesIO()
    if variant == "grayscale":
        image.convert("L").save(buf, "JPEG", quality=90)
    elif variant == "cmyk":
        image.convert("CMYK").save(buf, "JPEG", quality=90)
    elif variant == "progressive":
        image.save(buf, "JPEG", quality=90, progressive=True)
    else:
        image.save(buf, "JPEG", quality=90, subsampling=0)
    out = Preprocessor(lite0.input, 40_000_000)(buf.getvalue())
    assert out.shape == (3, 224, 224)
    logits = session.run(None, {"input": out[None]})[0][0]
    if variant != "grayscale":  # colour is part of what makes an espresso
        assert lite0.labels[int(logits.argmax())] == "espresso"


def test_png_accepted(lite0, session):
    """A PNG of a real photo takes the PNG decoder and still gets the photo's label from the model."""
    png = badimages.png_photo()  # espresso.jpg, re-encoded losslessly as PNG
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    out = Preprocessor(lite0.input, 40_000_000)(png)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    assert out.min() >= -1.01 and out.max() <= 1.01
    logits = session.run(None, {"input": out[None]})[0][0]
    assert lite0.labels[int(logits.argmax())] == "espresso"


def test_grayscale_and_rgba_become_rgb(lite0):
    pre = Preprocessor(lite0.input, 40_000_000)
    for mode in ("L", "RGBA", "P"):
        buf = io.BytesIO()
        Image.open(SAMPLES / "cat.jpg").convert(mode).save(buf, "PNG")
        assert pre(buf.getvalue()).shape == (3, 224, 224)


def test_writes_into_given_buffer(lite0):
    pre = Preprocessor(lite0.input, 40_000_000)
    buffer = np.zeros((2, 3, 224, 224), np.float32)
    pre(sample("cat.jpg"), out=buffer[1])
    assert not buffer[0].any() and buffer[1].any()


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"", "not a JPEG or PNG"),
        (b"hello world", "not a JPEG or PNG"),
        (badimages.gif(), "not a JPEG or PNG"),
        (badimages.truncated_jpeg(), "cannot decode"),
        (badimages.jpeg_bomb(), "limit"),
        (badimages.png_bomb(), "limit"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "cannot decode"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "cannot decode"),
    ],
    ids=["empty", "text", "gif", "truncated", "jpeg-bomb", "png-bomb", "jpeg-header-only", "png-header-only"],
)
def test_hostile_inputs_refused(lite0, payload, needle):
    with pytest.raises(BadImage, match=needle):
        Preprocessor(lite0.input, 40_000_000)(payload)


def test_corrupt_jpeg_is_refused_or_decoded_never_crashes(lite0):
    pre = Preprocessor(lite0.input, 40_000_000)
    try:
        out = pre(badimages.corrupt_jpeg())
    except BadImage:
        return
    assert out.shape == (3, 224, 224)


def test_pixel_limit_is_configurable(lite0):
    with pytest.raises(BadImage, match="over the limit"):
        Preprocessor(lite0.input, 100 * 100)(sample("cat.jpg"))

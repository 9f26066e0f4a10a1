"""Decode a camera frame and turn it into a model input tensor, safely and fast.

Runs in instance worker threads, never on the event loop. Safety: only JPEG and PNG are decoded,
the pixel count is checked from the header before any pixel is decoded (image bombs), and a
truncated file is an error, not a grey half-image. Speed: JPEGs are decoded by libjpeg-turbo through
simplejpeg (0.16 ms for a 224-px frame against Pillow's 0.30 ms, and it releases the GIL), at reduced
scale with DCT scaling when the frame is much larger than the model input; crop and resize happen in
one resample, and normalisation is one vectorised pass into a reused buffer. Whatever simplejpeg
cannot decode goes through Pillow, which either decodes it or says why not.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from agent.service.model_repo import InputSpec

try:  # OpenCV's resize is ~5x faster than Pillow's for the crop+resize step; optional.
    import cv2 as _cv2

    _cv2.setNumThreads(1)  # instance threads are the parallelism; no nested thread pools
    cv2: Any = _cv2
except ImportError:  # pragma: no cover - depends on the install
    cv2 = None

try:  # libjpeg-turbo's own API, with the GIL released while decoding; optional (Pillow otherwise).
    import simplejpeg as _simplejpeg

    simplejpeg: Any = _simplejpeg
except ImportError:  # pragma: no cover - depends on the install
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Truncated data must fail loudly; Pillow's default is already False, pin it.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's decompression-bomb warning becomes an error, process-wide (set once, not per frame:
# warnings.catch_warnings is neither thread-safe nor free).
warnings.simplefilter("error", Image.DecompressionBombWarning)


class BadImage(Exception):
    """The payload is not an image we will decode; the message is safe to send back."""


def sniff_format(data: bytes) -> str | None:
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data.startswith(PNG_MAGIC):
        return "PNG"
    return None


class Preprocessor:
    """Per-model preprocessing with the model's input spec and the agent's pixel budget."""

    def __init__(self, spec: InputSpec, max_pixels: int, use_opencv: bool = True) -> None:
        self.spec = spec
        self.use_opencv = use_opencv and cv2 is not None
        self.max_pixels = max_pixels
        self.height, self.width = spec.size
        mean = np.asarray(spec.mean, np.float32)
        std = np.asarray(spec.std, np.float32)
        # (x - mean) / std == x * scale + offset: one multiply-add per pixel.
        self._scale = (1.0 / std).astype(np.float32)
        self._offset = (-mean / std).astype(np.float32)

    def __call__(self, data: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """Decode `data` into `out` (C,H,W or H,W,C per the layout); returns the filled array."""
        return self.prepare(data, out)[0]

    def prepare(self, data: bytes, out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        """As __call__, plus the decoded frame's (width, height): a detector's boxes are mapped
        back to the frame with it (agent/frames/detection.py; a reduced-scale decode keeps the aspect)."""
        pixels = self.decode(data)
        size = (int(pixels.shape[1]), int(pixels.shape[0]))
        return self._normalise(self._crop_resize(pixels), out), size

    def prepare_pixels(self, pixels: np.ndarray, out: np.ndarray | None = None) -> tuple[int, int]:
        """An already decoded frame (or a cascade's crop of one) into `out`; returns its (width, height)."""
        self._normalise(self._crop_resize(pixels), out)
        return (int(pixels.shape[1]), int(pixels.shape[0]))

    def decode(self, data: bytes, full: bool = False) -> np.ndarray:
        """Header checks, then a (possibly reduced-scale) decode to RGB (H, W, 3); raises BadImage.
        `full`: no DCT scaling, for a cascade's crops cut from the original frame."""
        fmt = sniff_format(data)
        if fmt is None:
            raise BadImage("payload is not a JPEG or PNG image")
        if fmt == "JPEG" and simplejpeg is not None:
            pixels = self._decode_turbo(data, full)
            if pixels is not None:
                return pixels
        return np.asarray(self._decode_pillow(data, fmt, full))

    def _check_budget(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise BadImage("image has no pixels")
        if width * height > self.max_pixels:
            raise BadImage(
                f"image is {width}x{height} = {width * height} pixels, over the limit of {self.max_pixels}"
            )

    def _decode_turbo(self, data: bytes, full: bool = False) -> np.ndarray | None:
        """simplejpeg's strict decode; None hands the frame to Pillow (for its error message, or
        for a JPEG variant libjpeg-turbo's simple API refuses)."""
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None
        self._check_budget(width, height)
        need_w, need_h = self._needed_size(width, height)
        # Power-of-two DCT scaling only, as Pillow's draft mode does: libjpeg-turbo's M/8 factors
        # shrink further but flip near-tie top-1s against the full-resolution reference.
        factor = 1
        while (
            not full and factor < 8 and width // (factor * 2) >= need_w and height // (factor * 2) >= need_h
        ):
            factor *= 2
        try:
            pixels: np.ndarray = simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                min_width=-(-width // factor),
                min_height=-(-height // factor),
                strict=True,
            )
        except ValueError:
            return None
        return pixels

    def _decode_pillow(self, data: bytes, fmt: str, full: bool = False) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            self._check_budget(width, height)
            if fmt == "JPEG" and not full:
                # DCT scaling: decode at 1/2, 1/4 or 1/8 size, still >= what the crop needs.
                image.draft("RGB", self._needed_size(width, height))
            image.load()
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage(f"image bomb refused: {exc}") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadImage(f"cannot decode {fmt}: {exc}") from exc
        if image.mode != "RGB":
            return image.convert("RGB")
        return image

    def _needed_size(self, width: int, height: int) -> tuple[int, int]:
        """Smallest full-frame size whose centre crop still covers the model input at 1:1."""
        if self.spec.resize != "crop":  # the whole frame: stretched (each side covers) or letterboxed
            pick = max if self.spec.resize == "stretch" else min
            scale = pick(self.width / width, self.height / height)
            return (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)))
        short = min(width, height)
        scale = max(self.height, self.width) / (short * self.spec.crop_fraction)
        return (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)))

    def _resize(self, pixels: np.ndarray, width: int, height: int) -> np.ndarray:
        """The whole frame resized to width x height (area when shrinking a lot, else bilinear)."""
        if self.use_opencv:
            mode = cv2.INTER_AREA if pixels.shape[0] > height * 2 else cv2.INTER_LINEAR
            return np.asarray(cv2.resize(pixels, (width, height), interpolation=mode))
        image = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(image, dtype=np.uint8)

    def _crop_resize(self, pixels: np.ndarray) -> np.ndarray:
        height, width = pixels.shape[:2]
        if self.spec.resize == "stretch":
            return self._resize(pixels, self.width, self.height)
        if (
            self.spec.resize == "letterbox"
        ):  # aspect kept, centred, padded (agent/frames/detection.py undoes it)
            scale = min(self.width / width, self.height / height)
            used_w = min(self.width, max(1, round(width * scale)))
            used_h = min(self.height, max(1, round(height * scale)))
            canvas = np.full((self.height, self.width, 3), round(self.spec.pad), np.uint8)
            x0, y0 = (self.width - used_w) // 2, (self.height - used_h) // 2
            canvas[y0 : y0 + used_h, x0 : x0 + used_w] = self._resize(pixels, used_w, used_h)
            return canvas
        side = min(width, height) * self.spec.crop_fraction
        crop_w = side * self.width / max(self.height, self.width)
        crop_h = side * self.height / max(self.height, self.width)
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        if self.use_opencv:
            x0, y0 = round(left), round(top)
            x1, y1 = max(x0 + 1, round(left + crop_w)), max(y0 + 1, round(top + crop_h))
            region = pixels[y0:y1, x0:x1]
            shrink = region.shape[0] > self.height * 2
            # INTER_AREA averages when shrinking (no aliasing); bilinear otherwise, as Pillow does.
            mode = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            return np.asarray(cv2.resize(region, (self.width, self.height), interpolation=mode))
        resized = Image.fromarray(pixels).resize(
            (self.width, self.height),
            Image.Resampling.BILINEAR,
            box=(left, top, left + crop_w, top + crop_h),
            reducing_gap=3.0,
        )
        return np.asarray(resized, dtype=np.uint8)

    def _normalise(self, pixels: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        hwc_shape = (self.height, self.width, 3)
        if self.spec.dtype != "float32":
            # Quantised models take raw pixels; the runtime's input scale does the rest.
            data = pixels if self.spec.dtype == "uint8" else (pixels.astype(np.int16) - 128).astype(np.int8)
            data = data if self.spec.layout == "NHWC" else data.transpose(2, 0, 1)
            if out is None:
                return np.ascontiguousarray(data)
            out[...] = data
            return out
        if self.spec.layout == "NHWC":
            target = out if out is not None else np.empty(hwc_shape, np.float32)
            np.multiply(pixels, self._scale, out=target, casting="unsafe")
            target += self._offset
            return target
        target = out if out is not None else np.empty((3, self.height, self.width), np.float32)
        chw = pixels.transpose(2, 0, 1)
        np.multiply(chw, self._scale[:, None, None], out=target, casting="unsafe")
        target += self._offset[:, None, None]
        return target

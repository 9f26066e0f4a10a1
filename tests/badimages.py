"""Hostile and broken payloads, made from real photos so they look plausible to a decoder."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from tests.conftest import sample


def truncated_jpeg() -> bytes:
    data = sample("cat.jpg")
    return data[: len(data) // 2]


def corrupt_jpeg() -> bytes:
    data = bytearray(sample("cat.jpg"))
    for i in range(600, len(data) - 2, 7):  # scribble over the entropy-coded data
        data[i] = 0xFF if i % 2 else 0x00
    return bytes(data)


def jpeg_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A small real JPEG whose SOF header claims a huge frame."""
    data = bytearray(sample("cat.jpg"))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 50000, height: int = 50000) -> bytes:
    """A valid PNG of zeros: a few hundred KB that would inflate to gigabytes."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # 1-bit grey, filter byte 0
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(200)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(out, "GIF")
    return out.getvalue()


def png_photo() -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(sample("espresso.jpg"))).save(out, "PNG")
    return out.getvalue()

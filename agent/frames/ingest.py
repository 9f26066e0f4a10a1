"""Turn one MQTT message on an infer topic into a `Frame`, or an `IngestError` with its code.

Pure and cheap (no decoding): it runs on the event loop for every message. Model choice, in order:
topic suffix, MQTT 5 user property, JSON envelope, the configured default. Request id: MQTT 5
correlation data, user property, envelope, else a generated one.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from agent.protocol.schemas import Envelope, ErrorCode
from agent.protocol.topics import valid_tenant_key
from agent.service.errors import AgentError


class IngestError(AgentError):
    """A frame refused before it is queued; `code` is its error result's code (docs/protocol.md)."""

    def __init__(self, code: ErrorCode, message: str, request_id: str, model: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.request_id = request_id
        self.model = model


@dataclass(frozen=True)
class FrameMeta:
    """What MQTT 5 says about a message (all optional; MQTT 3.1.1 messages have none)."""

    correlation_data: bytes | None = None
    response_topic: str | None = None
    user_properties: dict[str, str] = field(default_factory=dict)
    expiry_s: int | None = None


@dataclass(eq=False)
class Frame:
    request_id: str
    model: str
    image: bytes
    received: float  # time.monotonic() at arrival
    response_topic: str | None = None
    correlation_data: bytes | None = None
    expires_at: float | None = None  # monotonic deadline from MQTT 5 message expiry
    caller_id: bool = False  # the request id is the caller's own (recognisable when sent again)
    tracked: bool = False  # remembered by the router's duplicate check until answered
    source_topic: str | None = None  # an [[inputs]] topic it came from (named in its answer)
    pool: str | None = None  # the device pool it was sent to (docs/pools.md), named in its answer
    # Cascades (agent/frames/cascade.py): a detector's frame keeps its full-resolution decode for
    # the crops; a crop carries its pixels and hands its answer to `on_answer`, not to MQTT.
    keep_pixels: bool = False
    pixels: Any = None  # numpy (H, W, 3) uint8 once decoded, or a crop's
    on_answer: Callable[[Any], None] | None = None


def request_id_from_correlation(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data.hex()
    return text if text.isprintable() and len(text) <= 256 else data.hex()


def parse_frame(
    payload: bytes,
    meta: FrameMeta,
    *,
    topic_model: str | None,
    default_model: str,
    max_bytes: int,
    now: float | None = None,
) -> Frame:
    received = time.monotonic() if now is None else now
    request_id = None
    if meta.correlation_data:
        request_id = request_id_from_correlation(meta.correlation_data)
    elif meta.user_properties.get("request_id"):
        request_id = meta.user_properties["request_id"][:256]
    model = topic_model or meta.user_properties.get("model") or None
    provisional_id = request_id or uuid.uuid4().hex

    if len(payload) == 0:
        raise IngestError("bad_image", "empty payload", provisional_id, model)
    if payload[:1] == b"{":
        # JSON envelope: base64 is 4/3 the size, so allow for it before decoding anything.
        if len(payload) > max_bytes * 4 // 3 + 4096:
            raise IngestError(
                "too_large", f"payload is {len(payload)} bytes, limit {max_bytes}", provisional_id
            )
        try:
            envelope = Envelope.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            detail = f"{where}: {first['msg']}" if where else first["msg"]
            # Echo the caller's own id (and model) when the JSON has them, so an MQTT 3.1.1 client
            # can match this error to its request.
            echoed_id, echoed_model = _envelope_ids(payload)
            raise IngestError(
                "bad_request",
                f"bad JSON envelope: {detail}",
                request_id or echoed_id or provisional_id,
                model or echoed_model,
            ) from exc
        request_id = request_id or envelope.request_id
        provisional_id = request_id or provisional_id
        model = model or envelope.model
        try:
            image = base64.b64decode(envelope.image_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise IngestError(
                "bad_request", f"image_b64 is not valid base64: {exc}", provisional_id, model
            ) from exc
        if not image:
            raise IngestError("bad_image", "image_b64 is empty", provisional_id, model)
    else:
        image = payload
    if len(image) > max_bytes:
        raise IngestError(
            "too_large", f"image is {len(image)} bytes, limit {max_bytes}", provisional_id, model
        )
    model = model or default_model
    if not valid_tenant_key(model):  # `name`, or `name@version` for one version exactly
        raise IngestError("unknown_model", f"{model[:80]!r} is not a valid model name", provisional_id)
    # An expiry interval of 0 is "no expiry" (some brokers pass an explicit 0 through).
    expires_at = received + meta.expiry_s if meta.expiry_s else None
    return Frame(
        request_id=provisional_id,
        model=model,
        image=image,
        received=received,
        response_topic=meta.response_topic,
        correlation_data=meta.correlation_data,
        expires_at=expires_at,
        caller_id=request_id is not None,
    )


def _envelope_ids(payload: bytes) -> tuple[str | None, str | None]:
    """request_id and model from an envelope that failed validation, where they are usable."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    rid, model = doc.get("request_id"), doc.get("model")
    rid = rid if isinstance(rid, str) and 0 < len(rid) <= 256 else None
    model = model if isinstance(model, str) and valid_tenant_key(model) else None
    return rid, model

"""Frame routing: a frame in -> refused with a coded error, or queued on the tenant serving its model.

Every frame gets exactly one answer (docs/protocol.md, "Answers"): an ingest error or a refusal is
answered here at once; a queued frame is answered by its tenant through `emit`. A frame that arrives
again with its caller's request id is not run again (agent/frames/dedup.py, docs/protocol.md "Duplicates").
Frames sent to a device pool (docs/pools.md) are answered the same way, on the pool's result topic.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from paho.mqtt.properties import Properties

from agent.frames.cascade import Cascades
from agent.frames.dedup import Answered, First, RecentRequests
from agent.frames.ingest import Frame, FrameMeta, IngestError, parse_frame
from agent.frames.tenant_table import TenantTable
from agent.protocol.schemas import DetectionResult, ErrorCode, ErrorInfo, ErrorResult, InferResult
from agent.protocol.topics import PoolTopics, Topics
from agent.service.config import IngestConfig
from agent.service.mqtt_session import Incoming
from agent.service.outbox import Outbox


def frame_meta(props: Properties | None) -> FrameMeta:
    """What MQTT 5 properties say about a frame (request id, model, where to answer, expiry)."""
    if props is None:
        return FrameMeta()
    user = {str(k): str(v) for k, v in (getattr(props, "UserProperty", None) or [])}
    response_topic = getattr(props, "ResponseTopic", None)
    if response_topic and ("+" in response_topic or "#" in response_topic):
        response_topic = None  # a wildcard topic cannot be published to
    return FrameMeta(
        correlation_data=getattr(props, "CorrelationData", None),
        response_topic=response_topic or None,
        user_properties=user,
        expiry_s=getattr(props, "MessageExpiryInterval", None),
    )


class FrameRouter:
    def __init__(
        self, topics: Topics, ingest: IngestConfig, table: TenantTable, results_qos: int = 1
    ) -> None:
        self.topics = topics
        self.results_qos = results_qos
        self.ingest = ingest
        self.table = table
        self.accepting = True
        self.rejected: Counter[str] = Counter()  # error code -> frames refused here (telemetry)
        self.recent: RecentRequests[Frame] = RecentRequests(ingest.dedup_entries, ingest.dedup_window_s)
        self.duplicates = 0  # frames not run because their request id was served or in flight
        self.outbox: Outbox | None = None  # attached at start, once the event loop runs
        # Called with every answer, on the thread that made it (Home Assistant's last top-1): cheap.
        self.answer_hooks: list[Callable[[Frame, Any], None]] = []
        self.cascades = Cascades(table, self._send)
        self._pools: dict[str, PoolTopics] = {}

    def pool_topics(self, pool: str) -> PoolTopics:
        if pool not in self._pools:
            self._pools[pool] = PoolTopics(pool, self.topics.prefix)
        return self._pools[pool]

    def pool_handler(self, pool: str) -> Callable[[Incoming], None]:
        """A handler for a pool's shared subscription: frames answered as this device's own, plus
        `pool` and `served_by` in the answer, which goes to the pool's result topic."""
        topics = self.pool_topics(pool)
        return lambda message: self._route(message, topics.model_from_topic(message.topic), None, pool)

    def on_frame(self, message: Incoming) -> None:
        """A message on edge/<id>/infer[/<model>] (event loop: cheap checks only, no decoding)."""
        self._route(message, self.topics.model_from_topic(message.topic), None)

    def input_handler(self, model: str) -> Callable[[Incoming], None]:
        """A handler for an `[[inputs]]` topic filter: its frames go to `model`, and their answers
        name the topic they came from (`source_topic`, docs/protocol.md "Other input topics")."""
        return lambda message: self._route(message, model, message.topic)

    def _route(
        self, message: Incoming, topic_model: str | None, source_topic: str | None, pool: str | None = None
    ) -> None:
        meta = frame_meta(message.properties)
        try:
            frame = parse_frame(
                message.payload,
                meta,
                topic_model=topic_model,
                default_model=self.ingest.default_model,
                max_bytes=self.ingest.max_payload_bytes,
            )
        except IngestError as exc:
            self.rejected[exc.code] += 1
            self._answer_unqueued(exc.request_id, exc.model, meta, exc.code, exc.message, source_topic, pool)
            return
        frame.source_topic = source_topic
        frame.pool = pool
        if not self.accepting:
            self._refuse(frame, "shutting_down", "the agent is stopping")
            return
        if frame.caller_id and self.recent.enabled and not self._first(frame, message.dup):
            return
        tenant = self.table.get(frame.model)
        if tenant is None:
            why = self.table.unavailable_reason(frame.model)
            if why is not None:
                self._refuse(frame, "unavailable", f"model {frame.model!r} {why}")
            else:
                served = ", ".join(self.table.served_models()) or "none"
                self._refuse(frame, "unknown_model", f"no tenant serves {frame.model!r} (served: {served})")
            return
        frame.keep_pixels = self.cascades.followed(frame.model)
        tenant.submit(frame)

    def _first(self, frame: Frame, redelivered: bool) -> bool:
        """True: run it. Else a repeat: a broker's redelivery (DUP) is dropped, since the first
        arrival's answer is in the outbox already; a caller that asks again gets the same answer
        (the stored result, or the one in flight when it comes)."""
        seen = self.recent.arrive((frame.model, frame.request_id), None if redelivered else frame)
        if isinstance(seen, First):
            frame.tracked = True
            return True
        self.duplicates += 1
        if isinstance(seen, Answered) and not redelivered:
            self._publish(frame, seen.answer)
        return False

    def _refuse(self, frame: Frame, code: ErrorCode, message: str) -> None:
        self.rejected[code] += 1
        self.emit(
            frame,
            ErrorResult(
                request_id=frame.request_id, model=frame.model, error=ErrorInfo(code=code, message=message)
            ),
        )

    def _answer_unqueued(
        self,
        request_id: str,
        model: str | None,
        meta: FrameMeta,
        code: ErrorCode,
        message: str,
        source_topic: str | None = None,
        pool: str | None = None,
    ) -> None:
        frame = Frame(
            request_id=request_id,
            model=model or "",
            image=b"",
            received=time.monotonic(),
            response_topic=meta.response_topic,
            correlation_data=meta.correlation_data,
            source_topic=source_topic,
            pool=pool,
        )
        self.emit(
            frame,
            ErrorResult(request_id=request_id, model=model, error=ErrorInfo(code=code, message=message)),
        )

    def emit(self, frame: Frame, outcome: InferResult | DetectionResult | ErrorResult) -> None:
        """A frame's one outcome (thread-safe): a cascade's crop goes back to its frame's cascade, a
        detector's boxes to the classifier following it (agent/frames/cascade.py), the rest out."""
        if frame.on_answer is not None:
            frame.on_answer(outcome)
            return
        if (
            isinstance(outcome, DetectionResult)
            and frame.pixels is not None
            and self.cascades.start(frame, outcome)
        ):
            return
        frame.pixels = None
        self._send(frame, outcome)

    def _send(self, frame: Frame, outcome: InferResult | DetectionResult | ErrorResult) -> None:
        """Send a frame's one answer: the result topic, plus its response topic."""
        for hook in self.answer_hooks:
            hook(frame, outcome)
        if frame.source_topic is None and frame.pool is None:
            payload = outcome.model_dump_json(exclude_none=True).encode()
        else:  # an [[inputs]] topic's frame says which topic; a pool's, which pool and member
            doc = outcome.model_dump(mode="json", exclude_none=True)
            if frame.source_topic is not None:
                doc["source_topic"] = frame.source_topic
            if frame.pool is not None:
                doc.update(pool=frame.pool, served_by=self.topics.device_id)
            payload = json.dumps(doc, separators=(",", ":")).encode()
        repeats: list[Frame] = []
        if frame.tracked:  # a served result is kept to answer repeats; an error is forgotten (retry runs)
            served = None if isinstance(outcome, ErrorResult) else payload
            repeats = self.recent.settle((frame.model, frame.request_id), served)
        self._publish(frame, payload)
        for repeat in repeats:
            self._publish(repeat, payload)

    def _publish(self, frame: Frame, payload: bytes) -> None:
        if self.outbox is None:
            return
        result = self.topics.result if frame.pool is None else self.pool_topics(frame.pool).result
        if frame.response_topic:
            self.outbox.put_many(
                [
                    (result, payload, self.results_qos, None),
                    (frame.response_topic, payload, self.results_qos, frame.correlation_data),
                ]
            )
        else:
            self.outbox.put(result, payload, self.results_qos)

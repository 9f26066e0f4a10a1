"""A small MQTT request client: send frames to an agent, collect its answers.

Used by `edge-agent infer`, `status`, `place` and `camera`, the demo and the benchmark. Over MQTT 5
each request carries correlation data and a private response topic (what `mosquitto_rr` does). A
broker that speaks only MQTT 3.1.1 gets the same requests as JSON envelopes, and the answers are
read from the device's result topic by request id (docs/protocol.md, "MQTT 3.1.1 brokers").

Connecting (and the MQTT 3.1.1 fallback) is agent.protocol.connection's `connect_once`, the rule the
agent and the console follow too. A publish or subscription the broker refuses (MQTT 5 reason code,
e.g. "Not authorized" from an ACL) raises `Refused` at once, naming the topic and the reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.broker import parse_broker_url
from agent.protocol.connection import Link, check_granted, connect_once
from agent.protocol.topics import PoolTopics, Topics
from agent.service.mqtt_session import NO_DELAY

# With "auto", how long an MQTT 5 CONNECT may go unanswered before 3.1.1 is tried (some 3.1.1-only
# brokers never answer it instead of refusing).
V5_CONNECT_TIMEOUT_S = 5.0


def connect(
    broker_url: str, tls_context: ssl.SSLContext | None = None, version: str = "5", **kwargs: Any
) -> aiomqtt.Client:
    """An MQTT client (`version` "5" or "3.1.1") for `mqtt://` or `mqtts://` URLs (credentials may
    be in the URL). For `mqtts://` without a context, the system's CA store verifies the broker.
    """
    broker = parse_broker_url(broker_url)
    if tls_context is None and broker.tls:
        tls_context = ssl.create_default_context()
    return aiomqtt.Client(
        broker.host,
        broker.port,
        protocol=aiomqtt.ProtocolVersion.V311 if version == "3.1.1" else aiomqtt.ProtocolVersion.V5,
        username=broker.username,
        password=broker.password,
        tls_context=tls_context,
        socket_options=NO_DELAY,
        **kwargs,
    )


@contextlib.asynccontextmanager
async def session(
    broker_url: str, tls_context: ssl.SSLContext | None = None, protocol: str = "auto", **kwargs: Any
) -> AsyncIterator[tuple[Link, str]]:
    """A connected client and its MQTT version. `protocol` "auto" tries MQTT 5 first and falls back
    to 3.1.1 when the broker refuses it or does not answer; "5" or "3.1.1" use only that version."""
    broker = parse_broker_url(broker_url)
    timeout = float(kwargs.pop("timeout", None) or 10.0)

    def client_for(version: str, connect_timeout_s: float | None) -> aiomqtt.Client:
        return connect(broker_url, tls_context, version, timeout=connect_timeout_s or timeout, **kwargs)

    link, version = await connect_once(broker.host, broker.port, protocol, client_for, V5_CONNECT_TIMEOUT_S)
    link.client.timeout = timeout  # a shorter wait was for CONNECT only
    try:
        yield link, version
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await link.client.__aexit__(None, None, None)


async def subscribe(link: Link, topic: str, qos: int = 1) -> None:
    """Subscribe; raises SubscribeRefused (a Refused) when the broker refused the filter."""
    check_granted(topic, await link.client.subscribe(topic, qos=qos))


@dataclass
class Reply:
    request_id: str
    payload: dict[str, Any]
    latency_ms: float
    source: str = ""

    @property
    def ok(self) -> bool:
        return "error" not in self.payload

    @property
    def best(self) -> dict[str, Any]:
        """The answer in one line's worth: a classifier's top-1, or a detector's best box with how
        many more it found (label "nothing found", score 0, when it found none)."""
        if "detections" in self.payload:
            found = self.payload["detections"]
            if not found:
                return {"label": "nothing found", "score": 0.0}
            more = f" (+{len(found) - 1})" if len(found) > 1 else ""
            return {**found[0], "label": f"{found[0]['label']}{more}"}
        return dict(self.payload["top"][0])

    @property
    def boxes(self) -> list[str]:
        """A cascade's answer (docs/detection.md "Cascades"): one line per box with its classes, the
        boxes not classified marked as such; none for other answers."""
        cascade = self.payload.get("cascade")
        if not cascade:
            return []
        lines = []
        for d in self.payload.get("detections", []):
            box = d["box"]
            where = f"x {box['x_min']:.2f}..{box['x_max']:.2f} y {box['y_min']:.2f}..{box['y_max']:.2f}"
            classes = d.get("classes")
            what = (
                ", ".join(f"{c['label']} {c['score']:.3f}" for c in classes[:3])
                if classes
                else f"(not classified{'' if cascade['status'] == 'complete' else ': ' + cascade['status']})"
            )
            lines.append(f"    {d['label']:12s} {d['score']:.3f}  {where}  {what}")
        return lines


@dataclass
class InferClient:
    broker_url: str
    device_id: str
    prefix: str = "edge"
    tls_context: ssl.SSLContext | None = None
    protocol: str = "auto"  # "5", "3.1.1", or "auto": MQTT 5 unless the broker refuses it
    pool: str | None = None  # send to this device pool (docs/pools.md) instead of `device_id`
    version: str = field(default="5", init=False)  # the version in use once connected
    _link: Link | None = field(default=None, init=False)
    _session: Any = field(default=None, init=False)
    _pending: dict[str, tuple[float, asyncio.Future[Reply]]] = field(default_factory=dict, init=False)
    _reader: asyncio.Task[None] | None = field(default=None, init=False)

    async def __aenter__(self) -> InferClient:
        self.topics = Topics(self.device_id, self.prefix)
        self.pool_topics = PoolTopics(self.pool, self.prefix) if self.pool else None
        user = parse_broker_url(self.broker_url).username or "_"
        # Answers only this user may read (docs/security.md, "Broker ACL").
        self.reply_topic = (
            self.pool_topics.reply(user, uuid.uuid4().hex)
            if self.pool_topics
            else f"{self.topics.base}/reply/{user}/{uuid.uuid4().hex}"
        )
        result = self.pool_topics.result if self.pool_topics else self.topics.result
        self._session = session(
            self.broker_url, self.tls_context, self.protocol, max_queued_incoming_messages=100_000
        )
        self._link, self.version = await self._session.__aenter__()
        self._link.client.pending_calls_threshold = 100_000  # many requests in flight is the point
        try:
            # MQTT 3.1.1 has no response topics: answers come on the device's result topic.
            await subscribe(self._link, self.reply_topic if self.version == "5" else result)
        except BaseException:
            await self._session.__aexit__(None, None, None)
            raise
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader:
            self._reader.cancel()
        if self._session is not None:
            await self._session.__aexit__(None, None, None)

    async def _read(self) -> None:
        assert self._link is not None
        async for message in self._link.client.messages:
            try:
                payload = json.loads(message.payload)  # type: ignore[arg-type,unused-ignore]
            except (TypeError, ValueError):
                payload = {"error": {"code": "client", "message": "unparseable reply"}}
            corr = getattr(message.properties, "CorrelationData", None) if message.properties else None
            key = corr.decode() if corr else None
            if key is None and isinstance(payload, dict):  # 3.1.1: the request id is in the answer
                key = payload.get("request_id")
            if key is None or key not in self._pending:
                continue
            started, fut = self._pending.pop(key)
            if not fut.done():
                fut.set_result(Reply(key, payload, (time.perf_counter() - started) * 1000.0))

    async def send(
        self, image: bytes, model: str | None = None, request_id: str | None = None, qos: int = 1
    ) -> asyncio.Future[Reply]:
        """Publish one frame; returns a future of its reply. Raises PublishRefused at once when the
        broker refused the frame (the future is then dropped)."""
        assert self._link is not None
        if self.pool_topics is not None and not model:
            raise ValueError("a pool's frames name their model (--model)")
        request_id = request_id or uuid.uuid4().hex
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (time.perf_counter(), fut)
        if self.version == "3.1.1":
            envelope: dict[str, Any] = {
                "request_id": request_id,
                "image_b64": base64.b64encode(image).decode(),
            }
            if model:
                envelope["model"] = model
            topic = self.pool_topics.infer(model) if self.pool_topics and model else self.topics.infer
            await self._publish(request_id, topic, json.dumps(envelope).encode(), qos, None)
            return fut
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = request_id.encode()
        if self.pool_topics is not None and model:
            topic = self.pool_topics.infer(model)
        else:
            topic = self.topics.infer_model(model) if model else self.topics.infer
        await self._publish(request_id, topic, image, qos, props)
        return fut

    async def _publish(
        self, request_id: str, topic: str, payload: bytes, qos: int, props: Properties | None
    ) -> None:
        assert self._link is not None
        try:
            await self._link.publish(
                topic, payload, qos=qos, properties=props, ack_wait_s=self._link.client.timeout
            )
        except aiomqtt.MqttError:
            self._pending.pop(request_id, None)
            raise

    async def infer(
        self, image: bytes, model: str | None = None, timeout_s: float = 30.0, retries: int = 0
    ) -> Reply:
        """One frame's answer. With `retries`, a frame not answered in time is sent again with the
        same request id: the device (or another pool member) answers a repeat of a frame it served
        with the same answer, without running it again (docs/pools.md)."""
        request_id = uuid.uuid4().hex
        for attempt in range(retries + 1):
            fut = await self.send(image, model, request_id)
            try:
                return await asyncio.wait_for(fut, timeout_s)
            except TimeoutError:
                if attempt == retries:
                    raise
        raise TimeoutError  # (not reached: the loop returns or raises)


async def read_retained(
    broker_url: str,
    topic: str,
    timeout_s: float = 5.0,
    tls_context: ssl.SSLContext | None = None,
    protocol: str = "auto",
) -> dict[str, Any] | None:
    """The retained message on `topic`, parsed as JSON, or None if none arrives in time.

    Messages on other topics are skipped: amqtt (MQTT 3.1.1) hands a new subscriber other retained
    messages too, such as the device's placement, once someone has subscribed to that topic."""
    async with session(broker_url, tls_context, protocol) as (link, _version):
        await subscribe(link, topic)
        try:
            async with asyncio.timeout(timeout_s):
                async for message in link.client.messages:
                    if not message.topic.matches(topic):
                        continue
                    return json.loads(message.payload)  # type: ignore[arg-type,no-any-return,unused-ignore]
        except TimeoutError:
            return None
    return None


async def publish_placement(
    broker_url: str,
    device_id: str,
    doc: dict[str, Any],
    timeout_s: float = 120.0,
    prefix: str = "edge",
    tls_context: ssl.SSLContext | None = None,
    protocol: str = "auto",
) -> tuple[bool, dict[str, Any]]:
    """Publish a retained placement and wait until the device applies or refuses that generation.

    Returns (applied, last status seen). Refusal: the status's `placement.refused.generation` matches.
    Raises PublishRefused when the broker refused the placement itself (an ACL).
    """
    topics = Topics(device_id, prefix)
    generation = doc["generation"]
    async with session(broker_url, tls_context, protocol) as (link, _version):
        client = link.client
        await subscribe(link, topics.status)
        # The retained status arrives first: only a status published after ours can answer it.
        baseline = 0.0
        status: dict[str, Any] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    if not message.topic.matches(topics.status):
                        continue  # amqtt may hand over other retained messages (read_retained)
                    status = json.loads(message.payload)
                    baseline = float(status.get("ts") or 0.0)
                    break
        await link.publish(topics.placement, json.dumps(doc).encode(), qos=1, retain=True)
        try:
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    if not message.topic.matches(topics.status):
                        continue
                    status = json.loads(message.payload)
                    if float(status.get("ts") or 0.0) <= baseline:
                        continue
                    placement = status.get("placement") or {}
                    refused = placement.get("refused") or {}
                    if refused.get("generation") == generation and float(refused.get("ts") or 0) > baseline:
                        return False, status
                    tenants = placement.get("tenants", [])
                    if placement.get("applied_generation") == generation and all(
                        t["state"] in ("ready", "failed") for t in tenants
                    ):
                        return True, status
        except TimeoutError:
            pass
        return False, status

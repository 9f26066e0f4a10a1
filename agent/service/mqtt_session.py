"""The agent's MQTT session: the only owner of the client.

aiomqtt does not reconnect by itself; this is the one place that does, with exponential backoff and
jitter. Subscriptions are data, replayed on every connect (also when the broker lost the session).
One client object lives as long as the session: after a reconnect paho itself sends again what the
broker had not acknowledged, with the same packet id and the DUP flag (QoS 1), or finishes the QoS 2
handshake where it stopped, so the broker delivers a QoS 2 result once (docs/reliability.md).
A handler that raises is logged and counted; it never stops message dispatch. The last will is a
retained `{"online": false}` on the status topic.

The per-message path is kept short because every frame crosses it on the event loop (measured in
docs/performance.md): handlers are called from paho's own topic-filtered callbacks with a
small `Incoming` record, not through aiomqtt's message queue and `Message`/`Topic` objects; and
packets paho queues on the loop are written on the loop's next turn, not through a cross-thread
wake-up and a writer registration per burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.broker import refuses_mqtt5, tcp_reachable, tls_context
from agent.service.config import BrokerConfig

log = logging.getLogger(__name__)

# Results are small and latency-bound: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms per hop.
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


@dataclass(frozen=True, slots=True)
class Incoming:
    """One received message, as handlers see it."""

    topic: str
    payload: bytes
    properties: Properties | None
    dup: bool = False  # the broker says it is sending this again (its ack may have been lost)


# Handlers run on the event loop and must not block; long work is spawned as a task.
Handler = Callable[[Incoming], None]


class NotConnected(Exception):
    """A publish was attempted while the session is down; the caller keeps the message."""


@dataclass(frozen=True)
class Subscription:
    filter: str
    qos: int
    handler: Handler


def build_tls_context(cfg: BrokerConfig) -> ssl.SSLContext | None:
    """The agent's TLS settings as a context (agent.protocol.broker): blocking, run it in a thread."""
    if not cfg.tls.enabled:
        return None
    return tls_context(cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.insecure)


class MqttSession:
    def __init__(
        self,
        cfg: BrokerConfig,
        client_id: str,
        will_topic: str,
        will_payload: bytes,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.will = aiomqtt.Will(will_topic, will_payload, qos=1, retain=True)
        self.subscriptions: list[Subscription] = []
        self.connected = asyncio.Event()
        self.connects = 0
        self.handler_errors = 0
        self.refused_publishes = 0
        self._on_connect = on_connect
        # Called when a live connection ends (what was in flight stays with paho, which sends it
        # again after the reconnect).
        self.on_disconnect: list[Callable[[], None]] = []
        self._client: aiomqtt.Client | None = None
        # paho message id -> called on PUBACK (QoS 1) or PUBCOMP (QoS 2). One table for the client's
        # lifetime: ids are unique within it, and unacknowledged ones are sent again after a reconnect.
        self._acks: dict[int, Callable[[], None]] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        # The MQTT version in use: 5 unless configured or the broker refused it ("auto").
        self.protocol = "3.1.1" if cfg.protocol == "3.1.1" else "5"
        self._v5_timeouts = 0  # MQTT 5 CONNECTs in a row that got no CONNACK (auto: then try 3.1.1)
        self._settled = cfg.protocol != "auto"  # a connection succeeded with the version in use

    def subscribe(self, filter_: str, handler: Handler, qos: int = 1) -> None:
        """Filters must not overlap: paho calls every matching callback, so a message matching two
        filters would be handled twice."""
        self.subscriptions.append(Subscription(filter_, qos, handler))

    async def run(self) -> None:
        """Connect, subscribe, dispatch; on any MQTT error back off and do it again. Until stop()."""
        tls = await asyncio.to_thread(build_tls_context, self.cfg)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        backoff = self.cfg.reconnect_min_s
        client, client_protocol = self._new_client(tls), self.protocol
        self._hook_paho(client)
        while not self._stopping:
            try:
                if client_protocol != self.protocol:  # auto: trying the other MQTT version
                    client, client_protocol = self._new_client(tls), self.protocol
                    self._hook_paho(client)
                if client._connected.done():
                    # aiomqtt keeps the last connection's CONNACK after a connection is lost: without
                    # a fresh future the next `async with` returns before the broker answers, and a
                    # refusal (a revoked password) shows as a 10 s timeout instead.
                    client._connected = asyncio.get_running_loop().create_future()
                async with client:
                    self._client = client
                    self._settle_protocol()
                    for sub in self.subscriptions:
                        await client.subscribe(sub.filter, qos=sub.qos)
                    self.connects += 1
                    self.connected.set()
                    backoff = self.cfg.reconnect_min_s
                    log.info("connected to mqtt %s:%d as %s", self.cfg.host, self.cfg.port, self.client_id)
                    if self._on_connect is not None:
                        await self._on_connect()
                    # Subscribed messages go to the paho callbacks (see `_hook_paho`); this loop sees
                    # only strays, and ends with an MqttError when the connection does.
                    async for message in client.messages:
                        self._dispatch(message)
            except aiomqtt.MqttError as exc:
                if self._stopping:
                    break
                timed_out = "timed out" in str(exc).lower()
                reachable = True
                if timed_out and not self._settled and self.protocol == "5":
                    reachable = await tcp_reachable(self.cfg.host, self.cfg.port)
                if self._try_other_version(exc, reachable):
                    continue
                delay = backoff * (0.5 + random.random())  # jitter spreads a fleet's reconnects
                log.warning("mqtt connection lost or refused (%s); retrying in %.1fs", exc, delay)
                self._down()
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.cfg.reconnect_max_s)
            finally:
                self._down()

    def _try_other_version(self, exc: aiomqtt.MqttError, reachable: bool = True) -> bool:
        """`broker.protocol = "auto"`, before the first connection: True to retry at once with the
        other version. A broker refuses MQTT 5 with "unsupported protocol version", or (some 3.1.1
        brokers) never answers its CONNECT: two such timeouts in a row also try 3.1.1. If 3.1.1 then
        fails too, the next attempt is MQTT 5 again."""
        if self._settled:
            return False
        if self.protocol == "3.1.1":
            self.protocol = "5"
            return False
        if isinstance(exc, MqttConnectError):
            refused = refuses_mqtt5(exc)
        else:
            # A timeout counts only when the broker took the TCP connection (an unanswered CONNECT).
            unanswered = "timed out" in str(exc).lower() and reachable
            self._v5_timeouts = self._v5_timeouts + 1 if unanswered else 0
            refused = self._v5_timeouts >= 2
        if refused:
            log.info("the broker did not accept an MQTT 5 connection (%s): trying MQTT 3.1.1", exc)
            self.protocol = "3.1.1"
        return refused

    def _settle_protocol(self) -> None:
        """Connected: the version in use is the broker's. Said once when it is 3.1.1 by fallback."""
        if self._settled:
            return
        self._settled = True
        if self.protocol == "3.1.1":
            log.warning(
                "the broker at %s:%d does not speak MQTT 5: using MQTT 3.1.1 (no response topics, "
                "correlation data, user properties or message expiry)",
                self.cfg.host,
                self.cfg.port,
            )

    def _new_client(self, tls: ssl.SSLContext | None) -> aiomqtt.Client:
        if self.protocol == "3.1.1":
            # A persistent session (clean session off): frames wait at the broker while the agent is
            # away, as with MQTT 5's session expiry (for as long as the broker keeps sessions).
            client = aiomqtt.Client(
                hostname=self.cfg.host,
                port=self.cfg.port,
                identifier=self.client_id,
                username=self.cfg.username,
                password=self.cfg.password,
                protocol=aiomqtt.ProtocolVersion.V311,
                will=self.will,
                keepalive=self.cfg.keepalive_s,
                clean_session=False,
                tls_context=tls,
                timeout=10.0,
                max_queued_incoming_messages=10_000,
                socket_options=NO_DELAY,
            )
            client.pending_calls_threshold = 10_000
            return client
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = self.cfg.session_expiry_s
        # How many QoS 1/2 frames the broker may send before their acks (config.BrokerConfig says
        # why wide; docs/operations.md, "The broker").
        connect_props.ReceiveMaximum = self.cfg.receive_maximum
        client = aiomqtt.Client(
            hostname=self.cfg.host,
            port=self.cfg.port,
            identifier=self.client_id,
            username=self.cfg.username,
            password=self.cfg.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=self.will,
            keepalive=self.cfg.keepalive_s,
            clean_start=False,
            properties=connect_props,
            tls_context=tls,
            timeout=10.0,
            max_queued_incoming_messages=10_000,
            socket_options=NO_DELAY,
        )
        # The outbox keeps up to 256 results in flight on purpose; aiomqtt warns above 10.
        client.pending_calls_threshold = 10_000
        return client

    def _hook_paho(self, client: aiomqtt.Client) -> None:
        """Take the hot paths from aiomqtt to paho, before connecting.

        - Each subscription's handler becomes a paho topic callback (paho's matcher, one `Incoming`).
        - PUBACKs of `publish_nowait` messages go to their callbacks; aiomqtt's awaitable publish
          costs a task, an Event and a future per message, so the outbox does not use it.
        - Outgoing packets are written on the loop's next turn (`flush` below), instead of aiomqtt's
          thread-safe wake-up plus a writer registration for every burst.
        """
        paho = client._client
        for sub in self.subscriptions:
            paho.message_callback_add(sub.filter, self._paho_callback(sub))
        aiomqtt_on_publish: Any = paho.on_publish
        acks = self._acks

        def on_publish(c: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
            done = acks.pop(mid, None)
            if done is not None:
                if getattr(reason_code, "is_failure", False):
                    # The broker refused it (MQTT 5 reason code, e.g. not authorised): resending
                    # would be refused again. Counted and logged; the message is not retried.
                    self.refused_publishes += 1
                    log.warning("broker refused a publish (message id %d): %s", mid, reason_code)
                try:
                    done()
                except Exception:  # a bug in a callback must not tear the connection down
                    log.exception("publish-acknowledged callback failed")
            elif aiomqtt_on_publish is not None:
                aiomqtt_on_publish(c, userdata, mid, reason_code, properties)

        paho.on_publish = on_publish

        scheduled = False  # one flush per burst of packets, per connection

        def flush() -> None:
            """Write what paho has queued; if the socket is full, finish when it is writable."""
            nonlocal scheduled
            scheduled = False
            try:
                paho.loop_write()
                sock = paho.socket()
                if paho.want_write() and sock is not None and self._loop is not None:
                    # paho still counts the write as registered and will not ask again: watch the
                    # socket here; aiomqtt's unregister callback removes the writer once all is sent.
                    self._loop.add_writer(sock.fileno(), flush)
            except Exception as exc:  # a broken pipe: end the connection the way aiomqtt would
                if not client._disconnected.done():
                    client._disconnected.set_exception(exc)

        def on_register_write(_client: Any, _userdata: Any, _sock: Any) -> None:
            nonlocal scheduled
            if scheduled or self._loop is None:
                return
            scheduled = True
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(flush)
            else:  # paho queues CONNECT from aiomqtt's connect thread
                self._loop.call_soon_threadsafe(flush)

        paho.on_socket_register_write = on_register_write

    def _paho_callback(self, sub: Subscription) -> Callable[[Any, Any, Any], None]:
        def on_message(_client: Any, _userdata: Any, message: Any) -> None:
            try:
                sub.handler(Incoming(message.topic, message.payload, message.properties, bool(message.dup)))
            except Exception:
                self.handler_errors += 1
                log.exception("handler for %s failed on %s", sub.filter, message.topic)

        return on_message

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None,
        done: Callable[[], None],
    ) -> None:
        """Hand a message to the client now; `done()` runs when the broker acknowledged it (QoS 1)
        or at once (QoS 0). Raises NotConnected. If the connection dies first, `done` never runs:
        the `on_disconnect` callbacks are the signal to send again."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise NotConnected(topic)
        if self.protocol == "3.1.1":
            properties = None  # (an answer spooled by an MQTT 5 run: its response topic copy has none)
        info = client._client.publish(topic, payload, qos, retain, properties)
        if info.rc != 0:
            raise NotConnected(f"{topic}: paho error {info.rc}")
        if qos == 0:
            done()
        else:
            self._acks[info.mid] = done

    def _down(self) -> None:
        was_up = self.connected.is_set()
        self.connected.clear()
        self._client = None
        if was_up:
            for callback in self.on_disconnect:
                callback()

    def _dispatch(self, message: aiomqtt.Message) -> None:
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        for sub in self.subscriptions:
            if message.topic.matches(sub.filter):
                try:
                    sub.handler(Incoming(message.topic.value, bytes(payload), message.properties))
                except Exception:
                    self.handler_errors += 1
                    log.exception("handler for %s failed on %s", sub.filter, message.topic)
                return

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        ack_wait_s: float = 30.0,
    ) -> None:
        """Publish and, for QoS 1, wait for the broker's ack. Raises NotConnected when down."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise NotConnected(topic)
        try:
            await client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties, timeout=ack_wait_s
            )
        except aiomqtt.MqttError as exc:
            raise NotConnected(f"{topic}: {exc}") from exc

    async def stop(self, final: tuple[str, bytes] | None = None) -> None:
        """Publish `final` (topic, payload; retained) if connected. The owner then cancels `run()`,
        whose `async with` sends a clean DISCONNECT (so the broker does not send the will)."""
        self._stopping = True
        client = self._client
        if client is not None and final is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.publish(final[0], final[1], qos=1, retain=True, timeout=5.0)

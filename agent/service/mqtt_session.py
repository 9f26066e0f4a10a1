"""The agent's MQTT session: the only owner of the agent's client.

The reconnect loop (exponential backoff with jitter, the MQTT 3.1.1 fallback) is the one in
agent.protocol.connection, shared with the CLI and the console. Subscriptions are data, replayed on
every connect (also when the broker lost the session). One client object per MQTT version lives as
long as the session: after a reconnect paho itself sends again what the broker had not acknowledged,
with the same packet id and the DUP flag (QoS 1), or finishes the QoS 2 handshake where it stopped,
so the broker delivers a QoS 2 result once (docs/reliability.md). A handler that raises is logged and
counted; it never stops message dispatch. A publish the broker refuses is logged with its topic and
counted (`publishes_refused`). The last will is a retained `{"online": false}` on the status topic.

The per-message path is kept short because every frame crosses it on the event loop (measured in
docs/performance.md): handlers are called from paho's own topic-filtered callbacks with a
small `Incoming` record, not through aiomqtt's message queue and `Message`/`Topic` objects; and
packets paho queues on the loop are written on the loop's next turn, not through a cross-thread
wake-up and a writer registration per burst (`Link.write_on_loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.broker import tls_context
from agent.protocol.connection import Backoff, Link, Nodes, PublishRefused, VersionChoice, keep_connected
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

    @property
    def route(self) -> str:
        """The filter messages are matched against: a shared subscription's (`$share/<group>/<f>`)
        messages carry topics matching `<f>`."""
        if self.filter.startswith("$share/"):
            return self.filter.split("/", 2)[2]
        return self.filter


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
        will_topic: str | None,
        will_payload: bytes,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.will = None if will_topic is None else aiomqtt.Will(will_topic, will_payload, qos=1, retain=True)
        self.subscriptions: list[Subscription] = []
        self.connected = asyncio.Event()
        self.connects = 0
        self.handler_errors = 0
        # Publishes the broker refused (an MQTT 5 failure reason code, e.g. "Not authorized" from an
        # ACL), counted since start: telemetry reports this number.
        self.publishes_refused = 0
        self._on_connect = on_connect
        # Called when a live connection ends (what was in flight stays with paho, which sends it
        # again after the reconnect).
        self.on_disconnect: list[Callable[[], None]] = []
        self._link: Link | None = None  # set while connected
        # One client per MQTT version (and node), kept across reconnects to the same node.
        self._links: dict[tuple[str, str, int], Link] = {}
        # The nodes of the broker cluster (one for a single broker): the next after a failure.
        self.nodes = Nodes(cfg.addresses())
        self._stopping = False
        # The MQTT version: 5 unless configured or the broker refused it ("auto", agent.protocol.connection).
        self._versions = VersionChoice(cfg.protocol)

    @property
    def protocol(self) -> str:
        """The MQTT version in use ("5" or "3.1.1")."""
        return self._versions.version

    @property
    def broker(self) -> str:
        """The broker node in use or tried next, `host:port` (status `mqtt_broker`)."""
        return self.nodes.label

    def subscribe(self, filter_: str, handler: Handler, qos: int = 1) -> None:
        """Filters must not overlap: paho calls every matching callback, so a message matching two
        filters would be handled twice."""
        self.subscriptions.append(Subscription(filter_, qos, handler))

    async def add_subscription(self, filter_: str, handler: Handler, qos: int = 1) -> None:
        """Subscribe while running (a device pool's share, docs/pools.md); kept for reconnects."""
        sub = Subscription(filter_, qos, handler)
        if any(s.filter == filter_ for s in self.subscriptions):
            return
        self.subscriptions.append(sub)
        for each in self._links.values():  # (a filter's callback replaces an earlier one: once only)
            each.route(sub.route, self._paho_callback(sub))
        link = self._link
        if link is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):  # (down: the next connect subscribes)
                await link.client.subscribe(filter_, qos=qos)

    async def remove_subscription(self, filter_: str) -> None:
        """Unsubscribe while running. Its handler stays routed: messages the broker had sent before
        the UNSUBACK still arrive, and each of them must still get its answer."""
        self.subscriptions = [s for s in self.subscriptions if s.filter != filter_]
        link = self._link
        if link is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):
                await link.client.unsubscribe(filter_)

    async def run(self) -> None:
        """Connect, subscribe, dispatch; on any MQTT error back off and do it again. Until stop()."""
        tls = await asyncio.to_thread(build_tls_context, self.cfg)
        loop = asyncio.get_running_loop()

        def link_for(version: str) -> Link:
            # One client per version while on one node: after a reconnect paho itself sends again
            # what the broker had not acknowledged. On another node (a session is a node's own) a new
            # client starts; what was in flight is sent again by its owner (`on_disconnect`).
            host, port = self.nodes.current
            key = (version, host, port)
            if key not in self._links:
                self._links = {k: v for k, v in self._links.items() if k[1:] == (host, port)}
                link = Link(self._new_client(tls, version, host, port))
                for sub in self.subscriptions:
                    link.route(sub.route, self._paho_callback(sub))
                link.write_on_loop(loop)
                self._links[key] = link
            return self._links[key]

        await keep_connected(
            nodes=self.nodes,
            versions=self._versions,
            backoff=Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s),
            link_for=link_for,
            serve=self._serve,
            down=self._down,
            stopping=lambda: self._stopping,
            logger=log,
        )

    async def _serve(self, link: Link) -> None:
        client = link.client
        self._link = link
        for sub in list(self.subscriptions):
            await client.subscribe(sub.filter, qos=sub.qos)
        self.connects += 1
        self.connected.set()
        many = len(self.nodes.addresses)
        of = f" (node {self.nodes.index + 1} of {many})" if many > 1 else ""
        log.info("connected to mqtt %s%s as %s", self.nodes.label, of, self.client_id)
        if self._on_connect is not None:
            await self._on_connect()
        # Subscribed messages go to the paho callbacks (`Link.route`); this loop sees only strays,
        # and ends with an MqttError when the connection does.
        async for message in client.messages:
            self._dispatch(message)

    def _new_client(self, tls: ssl.SSLContext | None, version: str, host: str, port: int) -> aiomqtt.Client:
        if version == "3.1.1":
            # A persistent session (clean session off): frames wait at the broker while the agent is
            # away, as with MQTT 5's session expiry (for as long as the broker keeps sessions).
            # (session_expiry_s 0, a pool's connection: a clean session, as with MQTT 5.)
            clean = self.cfg.session_expiry_s == 0
            session: dict[str, Any] = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": clean}
        else:
            connect_props = Properties(PacketTypes.CONNECT)
            connect_props.SessionExpiryInterval = self.cfg.session_expiry_s
            # How many QoS 1/2 frames the broker may send before their acks (config.BrokerConfig says
            # why wide; docs/operations.md, "The broker").
            connect_props.ReceiveMaximum = self.cfg.receive_maximum
            session = {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": False,
                "properties": connect_props,
            }
        client = aiomqtt.Client(
            hostname=host,
            port=port,
            identifier=self.client_id,
            username=self.cfg.username,
            password=self.cfg.password,
            will=self.will,
            keepalive=self.cfg.keepalive_s,
            tls_context=tls,
            timeout=10.0,
            max_queued_incoming_messages=10_000,
            socket_options=NO_DELAY,
            **session,
        )
        # The outbox keeps up to 256 results in flight on purpose; aiomqtt warns above 10.
        client.pending_calls_threshold = 10_000
        return client

    def _paho_callback(self, sub: Subscription) -> Callable[[Any, Any, Any], None]:
        def on_message(_client: Any, _userdata: Any, message: Any) -> None:
            try:
                sub.handler(Incoming(message.topic, message.payload, message.properties, bool(message.dup)))
            except Exception:
                self.handler_errors += 1
                log.exception("handler for %s failed on %s", sub.filter, message.topic)

        return on_message

    def _refused(self, topic: str, reason: object) -> None:
        """A publish the broker refused: resending would be refused again (docs/reliability.md)."""
        self.publishes_refused += 1
        log.warning("broker refused a publish to %s: %s", topic, reason)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None,
        done: Callable[[], None],
        refused: Callable[[object], None] | None = None,
    ) -> None:
        """Hand a message to the client now; `done()` runs when the broker acknowledged it (QoS 1)
        or at once (QoS 0), `refused(reason)` (else `done()`) when the broker refused it (logged and
        counted here). Raises NotConnected. If the connection dies first, neither runs: the
        `on_disconnect` callbacks are the signal to send again."""
        link = self._link
        if link is None or not self.connected.is_set():
            raise NotConnected(topic)
        if self.protocol == "3.1.1":
            properties = None  # (an answer spooled by an MQTT 5 run: its response topic copy has none)

        def acked(reason: object) -> None:
            if reason is None:
                done()
                return
            self._refused(topic, reason)
            (refused or (lambda _reason: done()))(reason)

        try:
            link.publish_nowait(topic, payload, qos, retain, properties, acked)
        except aiomqtt.MqttError as exc:
            raise NotConnected(f"{topic}: {exc}") from exc

    def _down(self) -> None:
        was_up = self.connected.is_set()
        self.connected.clear()
        self._link = None
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
        """Publish and, for QoS 1, wait for the broker's ack. Raises NotConnected when down, and
        PublishRefused (logged and counted) when the broker refused it."""
        link = self._link
        if link is None or not self.connected.is_set():
            raise NotConnected(topic)
        try:
            await link.publish(
                topic, payload, qos=qos, retain=retain, properties=properties, ack_wait_s=ack_wait_s
            )
        except PublishRefused as exc:
            self._refused(topic, exc.reason)
            raise
        except aiomqtt.MqttError as exc:
            raise NotConnected(f"{topic}: {exc}") from exc

    async def stop(self, final: tuple[str, bytes] | None = None) -> None:
        """Publish `final` (topic, payload; retained) if connected. The owner then cancels `run()`,
        whose `async with` sends a clean DISCONNECT (so the broker does not send the will)."""
        self._stopping = True
        link = self._link
        if link is not None and final is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await link.publish(final[0], final[1], qos=1, retain=True, ack_wait_s=5.0)

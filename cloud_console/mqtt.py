"""The console's MQTT connection: the only owner of its aiomqtt client.

aiomqtt does not reconnect by itself; `run()` uses the agent's loop for it (agent.protocol.connection:
exponential backoff with jitter, the MQTT 3.1.1 fallback, which goes back to MQTT 5 after a failed
3.1.1 try). Subscriptions are replayed on every connect. A handler that raises is logged and
counted; it never stops dispatch. Alone, the console needs no persistent session: what it must
know on (re)connect is retained at the broker (status, placement), and telemetry is live-only.

With a shared group (several console processes on one database) telemetry is history that must not
be lost when a process dies: it is subscribed at QoS 1 on a persistent session (a client id stable
across restarts, a session expiry), and each message is acknowledged only once the database holds
it (`ack_after`: the store's batch number; `acknowledge_through` when that batch is committed). A
process killed with messages unstored leaves them unacknowledged in its broker session: the broker
sends them again when the process (or another one taking its session over, docs/operations.md)
connects with that client id. MQTT 5 Receive Maximum is raised so that unacknowledged messages
do not throttle delivery (Mosquitto's default is 20 in flight).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol.broker import BrokerAddress, client_tls, credentials
from agent.protocol.connection import Backoff, Link, Nodes, VersionChoice, keep_connected
from agent.protocol.topics import fleet_filter
from cloud_console.config import BrokerSettings

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
WATCH_ID = 7  # the subscription identifier of a watched device's telemetry (a live copy, not stored)
RECEIVE_MAXIMUM = 65535  # QoS 1 messages in flight to us, unacknowledged until stored
SESSION_EXPIRY_S = 86400  # a shared-group process's session (and its unacknowledged messages) waits a day
YIELD_EVERY = 100  # messages handled between two turns of the event loop for everything else


class PublishFailed(Exception):
    """The broker is not reachable, did not acknowledge in time, or refused it (an ACL)."""


def _watch_properties() -> Properties:
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = WATCH_ID
    return props


def build_tls_context(address: BrokerAddress, settings: BrokerSettings) -> ssl.SSLContext | None:
    """Reads certificate files: blocking, so it runs in a thread, not on the event loop. The agent's
    rules (agent.protocol.broker); raises BrokerUrlError for unusable files."""
    return client_tls(address, settings.ca_file, settings.cert_file, settings.key_file, settings.tls_insecure)


class ConsoleMqtt:
    def __init__(
        self,
        address: BrokerAddress,
        settings: BrokerSettings,
        prefix: str,
        handler: Handler,
        shared_group: str | None = None,
        *,
        ack_after: Callable[[], int] | None = None,
        stable_id: str | None = None,
        live_handler: Handler | None = None,
    ) -> None:
        self.address = address  # the configured URL: its credentials, if any
        self.settings = settings
        # The nodes of a broker cluster (`broker.nodes`), else the one address: the console stays on
        # the node it is connected to and moves to the next when it fails (agent.protocol.connection).
        self.node_addresses = settings.addresses() if settings.nodes else [address]
        self.nodes = Nodes([(a.host, a.port) for a in self.node_addresses])
        self.prefix = prefix
        self.handler = handler
        # Shared group: the store's batch number a message lands in; acked once that batch is stored.
        self.ack_after = ack_after if shared_group else None
        host = socket.gethostname()[:24]
        default_id = f"edge-console-{host}-{stable_id}" if shared_group and stable_id else None
        self.client_id = settings.client_id or default_id or f"edge-console-{host}-{os.getpid()}"
        self.persistent = self.ack_after is not None
        telemetry = fleet_filter("telemetry", prefix)
        self.subscriptions: list[tuple[str, int]] = [
            (fleet_filter("status", prefix), 1),
            (fleet_filter("placement", prefix), 1),
            # Alone, telemetry is live-only (agents publish it at QoS 1; QoS 0 is enough for a live
            # view). A shared group splits it between console processes, at QoS 1: none is lost.
            (f"$share/{shared_group}/{telemetry}", 1) if shared_group else (telemetry, 0),
        ]
        self._unacked: deque[tuple[int, Link, int, int]] = deque()  # (batch, link, mid, qos)
        self.acked = 0
        self._paused = asyncio.Event()
        # Shared group: a device page open here wants every telemetry message of its device, not
        # only this process's share: a plain subscription to the device's topic (QoS 0, marked with
        # WATCH_ID) whose copies go to `live_handler` and are never stored.
        self.live_handler = live_handler
        self._watched: set[str] = set()
        self._drains: list[tuple[Link, deque[tuple[int, int, int]]]] = []  # sessions being drained
        self.connected = asyncio.Event()
        self.connects = 0
        self.received = 0
        self.handler_errors = 0
        self.last_error = ""
        self._link: Link | None = None
        self._stopping = False
        # "auto": MQTT 5 until the broker refuses it before any connection succeeded.
        self._versions = VersionChoice(settings.protocol)

    @property
    def broker(self) -> str:
        """The broker node in use or tried next, `host:port` (/healthz `mqtt_broker`)."""
        return self.nodes.label

    @property
    def version(self) -> str:
        """The MQTT version in use or tried next ("5" or "3.1.1")."""
        return self._versions.version

    def backlog(self) -> int:
        """Messages received from the broker and not yet handled (aiomqtt's incoming queue)."""
        link = self._link
        return len(link.client.messages) if link is not None else 0

    async def run(self) -> None:
        """Connect, subscribe, dispatch; on any MQTT error back off and do it again, until stop()."""
        # One TLS context for every node: one cluster, one scheme (checked in BrokerSettings).
        tls = await asyncio.to_thread(build_tls_context, self.node_addresses[0], self.settings)
        username, password = credentials(self.address, self.settings.username, self.settings.password)

        def link_for(version: str) -> Link:
            # A fresh client each time (a persistent session lives at the broker, not in the client).
            link = Link(self._new_client(version, username, password, tls))
            link.paho.manual_ack_set(True)  # acked in _dispatch, or once stored (acknowledge_through)
            return link

        def failed(exc: BaseException) -> None:
            self.last_error = str(exc)

        await keep_connected(
            nodes=self.nodes,
            versions=self._versions,
            backoff=Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s),
            link_for=link_for,
            serve=self._serve,
            down=self._down,
            stopping=lambda: self._stopping,
            on_error=failed,
            logger=log,
        )

    async def _serve(self, link: Link) -> None:
        client = link.client
        for topic, qos in self.subscriptions:
            await client.subscribe(topic, qos=qos)
        for topic in sorted(self._watched):
            await client.subscribe(topic, qos=0, properties=_watch_properties())
        self._link = link
        self.connects += 1
        self.connected.set()
        many = len(self.nodes.addresses)
        of = f" (node {self.nodes.index + 1} of {many})" if many > 1 else ""
        log.info("connected to mqtt %s%s as %s", self.nodes.label, of, self.client_id)
        handled = 0
        async for message in client.messages:
            if self._paused.is_set():  # stopping: what is not handled stays unacknowledged, in the session
                await asyncio.Event().wait()
            self._dispatch(message)
            handled += 1
            if handled % YIELD_EVERY == 0:
                # With a backlog, aiomqtt's queue hands out messages without ever suspending: let the
                # web requests, acknowledgements and an unsubscribe waiting on this event loop in
                # between (a page must not wait for the backlog to drain).
                await asyncio.sleep(0)

    def _new_client(
        self,
        version: str,
        username: str | None,
        password: str | None,
        tls: ssl.SSLContext | None,
        timeout_s: float = 10.0,
    ) -> aiomqtt.Client:
        v311 = version == "3.1.1"
        # Alone: MQTT 5 starts clean, 3.1.1 has a clean session. Shared group: the session persists.
        clean = not self.persistent
        session: dict[str, Any] = {"clean_session": clean} if v311 else {"clean_start": clean}
        if not v311:
            props = Properties(PacketTypes.CONNECT)
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            if self.persistent:
                props.SessionExpiryInterval = SESSION_EXPIRY_S
            session["properties"] = props
        host, port = self.nodes.current
        client = aiomqtt.Client(
            hostname=host,
            port=port,
            identifier=self.client_id,
            username=username,
            password=password,
            protocol=aiomqtt.ProtocolVersion.V311 if v311 else aiomqtt.ProtocolVersion.V5,
            keepalive=self.settings.keepalive_s,
            **session,
            tls_context=tls,
            timeout=timeout_s,
            max_queued_incoming_messages=200_000,
            socket_options=NO_DELAY,
        )
        client.pending_calls_threshold = 10_000  # a fleet-wide move publishes many at once
        return client

    def _down(self) -> None:
        self.connected.clear()
        self._link = None
        # Unacknowledged messages of the lost connection come again on the next (persistent session).
        self._unacked.clear()

    async def watch(self, topics: set[str]) -> None:
        """Follow exactly these topics live (the telemetry of devices whose page is open here)."""
        link = self._link
        added, gone = topics - self._watched, self._watched - topics
        self._watched = set(topics)  # replayed on every connect
        if link is None or not self.connected.is_set() or not (added or gone):
            return
        try:
            for topic in sorted(added):
                await link.client.subscribe(topic, qos=0, properties=_watch_properties())
            if gone:
                await link.client.unsubscribe(sorted(gone))
        except aiomqtt.MqttError as exc:
            log.warning("could not change the watched topics (%s); replayed at the next connect", exc)

    def _dispatch(self, message: aiomqtt.Message) -> None:
        self.received += 1
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        ids = getattr(message.properties, "SubscriptionIdentifier", None) if message.properties else None
        if ids and WATCH_ID in ids and message.qos == 0:
            if self.live_handler is not None:  # a live copy: shown, not stored (the shared copy is)
                try:
                    self.live_handler(message.topic.value, bytes(payload))
                except Exception:
                    self.handler_errors += 1
                    log.exception("live handler failed on %s", message.topic.value)
            return
        try:
            self.handler(message.topic.value, bytes(payload))
        except Exception:
            self.handler_errors += 1
            log.exception("handler failed on %s", message.topic.value)
        if message.qos == 0:
            return
        link = self._link
        if link is None:
            return
        if self.ack_after is not None and message.topic.value.endswith("/telemetry"):
            self._unacked.append((self.ack_after(), link, message.mid, message.qos))
        else:
            link.paho.ack(message.mid, message.qos)

    def acknowledge_through(self, batch: int) -> None:
        """The store committed batches up to `batch`: acknowledge their messages (event loop only)."""
        while self._unacked and self._unacked[0][0] <= batch:
            _, link, mid, qos = self._unacked.popleft()
            if link is self._link:
                link.paho.ack(mid, qos)
                self.acked += 1
        for link, pending in self._drains:
            while pending and pending[0][0] <= batch:
                _, mid, qos = pending.popleft()
                link.paho.ack(mid, qos)
                self.acked += 1

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1, wait for the broker's ack. Raises PublishFailed when down."""
        link = self._link
        if link is None or not self.connected.is_set():
            raise PublishFailed("not connected to the MQTT broker")
        try:  # a refusal (PublishRefused) names the topic and the broker's reason itself
            await link.publish(topic, payload, qos=qos, retain=retain, ack_wait_s=10.0)
        except aiomqtt.MqttError as exc:
            raise PublishFailed(str(exc) if topic in str(exc) else f"{topic}: {exc}") from exc

    async def leave(self, timeout_s: float = 5.0) -> None:
        """Before a clean stop: handle nothing more, and unsubscribe from everything, so the broker
        queues nothing for this process's session while it is gone (its share of telemetry goes to
        the others). What arrived and was not handled stays unacknowledged in the session: another
        process drains it (`drain_session`), or this one when it is back."""
        self._paused.set()
        link = self._link
        if link is None or not self.connected.is_set():
            return
        try:
            await asyncio.wait_for(
                link.client.unsubscribe([topic for topic, _ in self.subscriptions]), timeout_s
            )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("could not unsubscribe before stopping (%s); the session expires by itself", exc)

    async def drain_session(
        self, client_id: str, is_telemetry: Callable[[str], bool], idle_s: float = 2.0
    ) -> int:
        """Take over the persistent session of a console process that died (or stopped with messages
        left): connect under its client id, unsubscribe it (nothing more is queued there), hand the
        telemetry it holds to `handler`, and acknowledge each message once stored (through
        `acknowledge_through`, as for our own). Other kinds are acknowledged unhandled: a status
        queued minutes ago is older than the one we hold. Returns when nothing arrived for `idle_s`
        and everything handed over is acknowledged. Raises aiomqtt.MqttError when it cannot connect
        (the owner came back and took its session again, for one)."""
        username, password = credentials(self.address, self.settings.username, self.settings.password)
        tls = await asyncio.to_thread(build_tls_context, self.node_addresses[0], self.settings)
        own_id = self.client_id
        self.client_id = client_id
        try:
            # A session with many messages in flight takes the broker a while to resume (measured:
            # 10 s was not enough for ~10,000 with Mosquitto 2.0 on a busy machine).
            client = self._new_client("5", username, password, tls, timeout_s=120.0)
        finally:
            self.client_id = own_id
        link = Link(client)
        link.paho.manual_ack_set(True)
        drained = 0
        async with client:
            await client.unsubscribe([topic for topic, _ in self.subscriptions])
            pending: deque[tuple[int, int, int]] = deque()  # (batch, mid, qos)
            self._drains.append((link, pending))
            try:
                messages = aiter(client.messages)
                while True:
                    try:
                        message = await asyncio.wait_for(anext(messages), idle_s)
                    except TimeoutError:
                        break
                    payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
                    if message.qos and is_telemetry(message.topic.value) and self.ack_after is not None:
                        self.handler(message.topic.value, bytes(payload))
                        pending.append((self.ack_after(), message.mid, message.qos))
                        drained += 1
                    elif message.qos:
                        link.paho.ack(message.mid, message.qos)
                for _ in range(int(30 / 0.05)):  # until the store committed what we handed over
                    if not pending:
                        break
                    await asyncio.sleep(0.05)
            finally:
                self._drains.remove((link, pending))
        log.info("drained %d telemetry messages from the session of %s", drained, client_id)
        return drained

    def stop(self) -> None:
        """Stop reconnecting. The owner then cancels `run()`, whose `async with` disconnects cleanly."""
        self._stopping = True

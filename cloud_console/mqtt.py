"""The console's MQTT connection: the only owner of its aiomqtt client.

aiomqtt does not reconnect by itself; `run()` uses the agent's loop for it (agent.protocol.connection:
exponential backoff with jitter, the MQTT 3.1.1 fallback, which goes back to MQTT 5 after a failed
3.1.1 try). Subscriptions are replayed on every connect. A handler that raises is logged and
counted; it never stops dispatch. The console needs no persistent session: what it must know on
(re)connect is retained at the broker (status, placement), and telemetry is live-only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

import aiomqtt

from agent.protocol.broker import BrokerAddress, client_tls, credentials
from agent.protocol.connection import Backoff, Link, VersionChoice, keep_connected
from agent.protocol.topics import fleet_filter
from cloud_console.config import BrokerSettings

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
YIELD_EVERY = 100  # messages handled between two turns of the event loop for everything else


class PublishFailed(Exception):
    """The broker is not reachable, did not acknowledge in time, or refused it (an ACL)."""


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
    ) -> None:
        self.address = address
        self.settings = settings
        self.prefix = prefix
        self.handler = handler
        self.client_id = settings.client_id or f"edge-console-{socket.gethostname()[:24]}-{os.getpid()}"
        telemetry = fleet_filter("telemetry", prefix)
        self.subscriptions: list[tuple[str, int]] = [
            (fleet_filter("status", prefix), 1),
            (fleet_filter("placement", prefix), 1),
            # Telemetry is live-only here (agents publish it at QoS 1; QoS 0 is enough for a live view).
            # A shared group splits it between console workers.
            (f"$share/{shared_group}/{telemetry}" if shared_group else telemetry, 0),
        ]
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
    def version(self) -> str:
        """The MQTT version in use or tried next ("5" or "3.1.1")."""
        return self._versions.version

    def backlog(self) -> int:
        """Messages received from the broker and not yet handled (aiomqtt's incoming queue)."""
        link = self._link
        return len(link.client.messages) if link is not None else 0

    async def run(self) -> None:
        """Connect, subscribe, dispatch; on any MQTT error back off and do it again, until stop()."""
        tls = await asyncio.to_thread(build_tls_context, self.address, self.settings)
        username, password = credentials(self.address, self.settings.username, self.settings.password)

        def link_for(version: str) -> Link:
            # A fresh client each time: the console keeps no session.
            return Link(self._new_client(version, username, password, tls))

        def failed(exc: BaseException) -> None:
            self.last_error = str(exc)

        await keep_connected(
            host=self.address.host,
            port=self.address.port,
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
        self._link = link
        self.connects += 1
        self.connected.set()
        log.info("connected to mqtt %s:%d as %s", self.address.host, self.address.port, self.client_id)
        handled = 0
        async for message in client.messages:
            self._dispatch(message)
            handled += 1
            if handled % YIELD_EVERY == 0:
                # With a backlog, aiomqtt's queue hands out messages without ever suspending: let the
                # web requests waiting on this event loop in between (a page must not wait for the
                # backlog to drain).
                await asyncio.sleep(0)

    def _new_client(
        self, version: str, username: str | None, password: str | None, tls: ssl.SSLContext | None
    ) -> aiomqtt.Client:
        v311 = version == "3.1.1"
        # MQTT 5 starts clean; 3.1.1 has a clean session instead (the console keeps no session).
        session: dict[str, Any] = {"clean_session": True} if v311 else {"clean_start": True}
        client = aiomqtt.Client(
            hostname=self.address.host,
            port=self.address.port,
            identifier=self.client_id,
            username=username,
            password=password,
            protocol=aiomqtt.ProtocolVersion.V311 if v311 else aiomqtt.ProtocolVersion.V5,
            keepalive=self.settings.keepalive_s,
            **session,
            tls_context=tls,
            timeout=10.0,
            max_queued_incoming_messages=200_000,
            socket_options=NO_DELAY,
        )
        client.pending_calls_threshold = 10_000  # a fleet-wide move publishes many at once
        return client

    def _down(self) -> None:
        self.connected.clear()
        self._link = None

    def _dispatch(self, message: aiomqtt.Message) -> None:
        self.received += 1
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        try:
            self.handler(message.topic.value, bytes(payload))
        except Exception:
            self.handler_errors += 1
            log.exception("handler failed on %s", message.topic.value)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1, wait for the broker's ack. Raises PublishFailed when down."""
        link = self._link
        if link is None or not self.connected.is_set():
            raise PublishFailed("not connected to the MQTT broker")
        try:  # a refusal (PublishRefused) names the topic and the broker's reason itself
            await link.publish(topic, payload, qos=qos, retain=retain, ack_wait_s=10.0)
        except aiomqtt.MqttError as exc:
            raise PublishFailed(str(exc) if topic in str(exc) else f"{topic}: {exc}") from exc

    def stop(self) -> None:
        """Stop reconnecting. The owner then cancels `run()`, whose `async with` disconnects cleanly."""
        self._stopping = True

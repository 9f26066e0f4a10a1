"""The console's MQTT connection: the only owner of its aiomqtt client.

aiomqtt does not reconnect by itself; `run()` is the one loop that does, with exponential backoff
and jitter. Subscriptions are replayed on every connect. A handler that raises is logged and
counted; it never stops dispatch. The console needs no persistent session: what it must know on
(re)connect is retained at the broker (status, placement), and telemetry is live-only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any

import aiomqtt

from agent.protocol.broker import BrokerAddress, client_tls, credentials, refuses_mqtt5, tcp_reachable
from agent.protocol.topics import fleet_filter
from cloud_console.config import BrokerSettings

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


class PublishFailed(Exception):
    """The broker is not reachable or did not acknowledge in time; nothing was published."""


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
        self._client: aiomqtt.Client | None = None
        self._stopping = False
        # "auto": MQTT 5 until the broker refuses it before any connection succeeded.
        self.version = "3.1.1" if settings.protocol == "3.1.1" else "5"
        self._settled = settings.protocol != "auto"

    def backlog(self) -> int:
        """Messages received from the broker and not yet handled (aiomqtt's incoming queue)."""
        client = self._client
        return len(client.messages) if client is not None else 0

    async def run(self) -> None:
        """Connect, subscribe, dispatch; on any MQTT error back off and do it again, until stop()."""
        tls = await asyncio.to_thread(build_tls_context, self.address, self.settings)
        username, password = credentials(self.address, self.settings.username, self.settings.password)
        backoff = self.settings.reconnect_min_s
        timeouts = 0  # MQTT 5 CONNECTs in a row left unanswered ("auto": then 3.1.1 is tried)
        while not self._stopping:
            client = self._new_client(username, password, tls)
            try:
                async with client:
                    for topic, qos in self.subscriptions:
                        await client.subscribe(topic, qos=qos)
                    self._client = client
                    self._settled = True  # the version that connected is the broker's
                    self.connects += 1
                    self.connected.set()
                    backoff = self.settings.reconnect_min_s
                    log.info(
                        "connected to mqtt %s:%d as %s", self.address.host, self.address.port, self.client_id
                    )
                    async for message in client.messages:
                        self._dispatch(message)
            except aiomqtt.MqttError as exc:
                if self._stopping:
                    break
                if not self._settled:
                    if self.version == "3.1.1" and self.settings.protocol == "auto":
                        self.version, timeouts = "5", 0  # 3.1.1 failed too: MQTT 5 again next time
                    else:
                        # A timeout counts only when the broker took the TCP connection.
                        unanswered = "timed out" in str(exc).lower() and await tcp_reachable(
                            self.address.host, self.address.port
                        )
                        timeouts = timeouts + 1 if unanswered else 0
                        if self.version == "5" and (refuses_mqtt5(exc) or timeouts >= 2):
                            log.warning("the broker does not speak MQTT 5 (%s): using MQTT 3.1.1", exc)
                            self.version = "3.1.1"
                            continue
                self.last_error = str(exc)
                delay = backoff * (0.5 + random.random())  # jitter spreads reconnects of many workers
                log.warning("mqtt connection lost or refused (%s); retrying in %.1fs", exc, delay)
                self._down()
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.settings.reconnect_max_s)
            finally:
                self._down()

    def _new_client(
        self, username: str | None, password: str | None, tls: ssl.SSLContext | None
    ) -> aiomqtt.Client:
        v311 = self.version == "3.1.1"
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
        self._client = None

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
        client = self._client
        if client is None or not self.connected.is_set():
            raise PublishFailed("not connected to the MQTT broker")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=10.0)
        except aiomqtt.MqttError as exc:
            raise PublishFailed(f"{topic}: {exc}") from exc

    def stop(self) -> None:
        """Stop reconnecting. The owner then cancels `run()`, whose `async with` disconnects cleanly."""
        self._stopping = True

"""The one MQTT connection rule, for the agent's session, the CLI's client and the console.

aiomqtt does not reconnect by itself. `keep_connected` is the loop that does (exponential backoff with
jitter, `Backoff`; with several nodes of a broker cluster, `Nodes`, each attempt after a failure goes
to the next node); `connect_once` is the CLI's single attempt. Both choose the MQTT version with
`VersionChoice`: with `protocol = "auto"` a broker that refuses MQTT 5, or that took the TCP
connection and left MQTT 5 CONNECTs unanswered, gets MQTT 3.1.1; a broker that is down does not
(docs/protocol.md#mqtt-311-brokers). `Link` is the only code that touches aiomqtt's private parts
(its paho client and two connection futures); tests/test_mqtt_connection.py pins what it relies on.

A publish the broker refuses (an MQTT 5 PUBACK reason code >= 0x80, e.g. "Not authorized" from an
ACL) is `PublishRefused`, naming the topic and the reason: aiomqtt's own publish ignores the code.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.properties import Properties

from agent.protocol.broker import refuses_mqtt5, tcp_reachable

log = logging.getLogger(__name__)


def is_timeout(exc: BaseException) -> bool:
    """aiomqtt says "Operation timed out" (a CONNECT or an ack not answered in time) only in its text."""
    return isinstance(exc, TimeoutError) or "timed out" in str(exc).lower()


class Refused(aiomqtt.MqttError):
    """The broker answered a request with a failure reason code (MQTT 5; e.g. an ACL's "Not authorized")."""

    action = "request"

    def __init__(self, topic: str, reason: object) -> None:
        self.topic = topic
        self.reason = str(reason)
        super().__init__(f"the broker refused the {self.action} to {topic}: {self.reason}")


class PublishRefused(Refused):
    """A PUBACK / PUBREC with a failure reason code: sending it again would be refused again."""

    action = "publish"


class SubscribeRefused(Refused):
    """A SUBACK with a failure reason code for this filter."""

    action = "subscription"


def check_granted(topic: str, granted: Any) -> None:
    """Raise SubscribeRefused when a SUBACK refused `topic` (aiomqtt returns the codes, it does not
    raise). MQTT 3.1.1 brokers say 0x80; MQTT 5 ones a reason code >= 0x80."""
    for code in granted or ():
        value = getattr(code, "value", code)
        if isinstance(value, int) and value >= 0x80:
            raise SubscribeRefused(topic, code)


class Backoff:
    """Exponential backoff with jitter (x0.5..x1.5): a fleet that lost its broker does not come back
    all at once."""

    def __init__(self, min_s: float, max_s: float, rand: Callable[[], float] = random.random) -> None:
        self.min_s, self.max_s = min_s, max_s
        self._rand = rand
        self._next = min_s

    def reset(self) -> None:
        self._next = self.min_s

    def delay(self) -> float:
        """The wait before this attempt; the next one waits twice as long, up to `max_s`."""
        delay = self._next * (0.5 + self._rand())
        self._next = min(self._next * 2, self.max_s)
        return delay


class Nodes:
    """The broker nodes of one cluster, in the configured order. A pure decision (its table is in
    tests/test_broker_nodes.py): a client stays on the node it is connected to; when an attempt
    fails or a connection is lost, the next attempt goes to the next node, round and round (the
    backoff between attempts is `Backoff`'s). One node is the plain single-broker case."""

    def __init__(self, addresses: Sequence[tuple[str, int]]) -> None:
        if not addresses:
            raise ValueError("at least one broker node")
        self.addresses = list(addresses)
        self.index = 0

    @property
    def current(self) -> tuple[str, int]:
        return self.addresses[self.index]

    @property
    def label(self) -> str:
        """`host:port` of the current node (IPv6 hosts in brackets)."""
        host, port = self.current
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def failed(self) -> bool:
        """The current node failed: move to the next. True when there was another to move to."""
        if len(self.addresses) == 1:
            return False
        self.index = (self.index + 1) % len(self.addresses)
        return True


class VersionChoice:
    """Which MQTT version to try next. A pure decision (tests/test_mqtt_connection.py has its table).

    `configured` "5" or "3.1.1" is used as is. "auto" starts with MQTT 5 and, until a connection
    succeeds, switches to 3.1.1 when the broker refuses 5 (CONNACK "unsupported protocol version")
    or leaves `unanswered_needed` MQTT 5 CONNECTs in a row unanswered although it took the TCP
    connection. If 3.1.1 then fails too, the next attempt is MQTT 5 again. Once connected the
    version is the broker's and never changes."""

    def __init__(self, configured: str, unanswered_needed: int = 2) -> None:
        self.version = "3.1.1" if configured == "3.1.1" else "5"
        self.settled = configured != "auto"
        self.unanswered_needed = unanswered_needed
        self._unanswered = 0

    @property
    def can_fall_back(self) -> bool:
        return not self.settled and self.version == "5"

    def needs_reachability(self, exc: BaseException) -> bool:
        """Whether `failed` needs to know if the broker takes TCP connections (a CONNECT timeout)."""
        return self.can_fall_back and is_timeout(exc)

    def failed(self, exc: BaseException, reachable: bool = True) -> bool:
        """A connection attempt failed: True to try again at once with `self.version` (now 3.1.1)."""
        if self.settled:
            return False
        if self.version == "3.1.1":
            self.version, self._unanswered = "5", 0
            return False
        # (A CONNACK's code is read only from a connect error: other errors' codes are paho's own.)
        connack = isinstance(exc, MqttConnectError)
        if refuses_mqtt5(exc) if connack else "protocol version" in str(exc).lower():
            self.version = "3.1.1"
            return True
        # A timeout counts only when the broker took the TCP connection (an unanswered CONNECT).
        self._unanswered = self._unanswered + 1 if is_timeout(exc) and reachable else 0
        if self._unanswered >= self.unanswered_needed:
            self.version = "3.1.1"
            return True
        return False

    def connected(self) -> bool:
        """A connection succeeded: True the first time, when 3.1.1 came by fallback (say it once)."""
        fell_back = not self.settled and self.version == "3.1.1"
        self.settled = True
        return fell_back


# -- the adapter: aiomqtt's private parts, in one place ----------------------------------------------

Done = Callable[[Any], None]  # called with None (acknowledged) or the failure reason code


class Link:
    """One aiomqtt client plus what aiomqtt does not offer publicly: its paho client (for topic
    callbacks and publishes without a task per message), the PUBACK reason codes, a fresh CONNACK
    future after a lost connection, and ending a connection from outside.

    Create it before connecting: it takes over paho's `on_publish` (passing on what it did not send).
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.paho: paho.Client = client._client
        self._acks: dict[int, tuple[str, Done]] = {}
        aiomqtt_on_publish: Any = self.paho.on_publish
        acks = self._acks

        def on_publish(c: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
            entry = acks.pop(mid, None)
            if entry is None:
                if aiomqtt_on_publish is not None:
                    aiomqtt_on_publish(c, userdata, mid, reason_code, properties)
                return
            try:
                entry[1](reason_code if getattr(reason_code, "is_failure", False) else None)
            except Exception:  # a bug in a callback must not tear the connection down
                log.exception("publish-acknowledged callback failed (%s)", entry[0])

        self.paho.on_publish = on_publish

    def rearm(self) -> None:
        """Before `async with` on a client used before: aiomqtt keeps the last connection's CONNACK
        after the connection is lost, so without a fresh future the next `async with` returns before
        the broker answers, and a refusal (a revoked password) shows as a timeout later instead."""
        if self.client._connected.done():
            self.client._connected = asyncio.get_running_loop().create_future()

    def fail(self, exc: BaseException) -> None:
        """End the connection the way aiomqtt does when a write fails (its message loop raises)."""
        if not self.client._disconnected.done():
            self.client._disconnected.set_exception(exc)

    def route(self, filter_: str, callback: Callable[[Any, Any, Any], None]) -> None:
        """Messages matching `filter_` go to `callback(client, userdata, paho message)` on the loop,
        not through aiomqtt's queue."""
        self.paho.message_callback_add(filter_, callback)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None,
        done: Done,
    ) -> None:
        """Hand a message to paho; `done(None)` on its ack (at once for QoS 0), `done(reason)` when
        the broker refused it. Raises aiomqtt.MqttCodeError when paho cannot take it (not connected).
        Unacknowledged messages stay with paho, which sends them again after a reconnect."""
        info = self.paho.publish(topic, payload, qos, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, f"could not publish to {topic}")
        if qos == 0:
            done(None)
        else:
            self._acks[info.mid] = (topic, done)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        ack_wait_s: float = 10.0,
    ) -> None:
        """Publish and wait for the broker's ack. Raises PublishRefused (a failure reason code) or
        aiomqtt.MqttError (not connected, or no ack within `ack_wait_s`: "Operation timed out")."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(reason: Any) -> None:
            if not answer.done():
                answer.set_result(reason)

        self.publish_nowait(topic, payload, qos, retain, properties, done)
        try:
            reason = await asyncio.wait_for(answer, ack_wait_s)
        except TimeoutError:
            raise aiomqtt.MqttError("Operation timed out") from None
        if reason is not None:
            raise PublishRefused(topic, reason)

    def write_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Packets paho queues are written on the loop's next turn, once per burst, instead of
        aiomqtt's thread-safe wake-up plus a writer registration for every packet (measured in
        docs/performance.md). Call before connecting, from the loop's thread."""
        paho_client = self.paho
        loop_thread = threading.get_ident()
        scheduled = False

        def flush() -> None:
            """Write what paho has queued; if the socket is full, finish when it is writable."""
            nonlocal scheduled
            scheduled = False
            try:
                paho_client.loop_write()
                sock = paho_client.socket()
                if paho_client.want_write() and sock is not None:
                    # paho still counts the write as registered and will not ask again: watch the
                    # socket here; aiomqtt's unregister callback removes the writer once all is sent.
                    loop.add_writer(sock.fileno(), flush)
            except Exception as exc:  # a broken pipe: end the connection the way aiomqtt would
                self.fail(exc)

        def on_register_write(_client: Any, _userdata: Any, _sock: Any) -> None:
            nonlocal scheduled
            if scheduled:
                return
            scheduled = True
            if threading.get_ident() == loop_thread:
                loop.call_soon(flush)
            else:  # paho queues CONNECT from aiomqtt's connect thread
                loop.call_soon_threadsafe(flush)

        paho_client.on_socket_register_write = on_register_write


# -- the loops ------------------------------------------------------------------------------------


async def keep_connected(
    *,
    host: str = "",
    port: int = 0,
    nodes: Nodes | None = None,
    versions: VersionChoice,
    backoff: Backoff,
    link_for: Callable[[str], Link],
    serve: Callable[[Link], Awaitable[None]],
    down: Callable[[], None],
    stopping: Callable[[], bool],
    on_error: Callable[[BaseException], None] | None = None,
    logger: logging.Logger = log,
) -> None:
    """Connect, `serve` (subscribe, dispatch; it returns or raises MqttError when the connection
    ends), and on any MQTT error back off and do it again, until `stopping()`. `link_for(version)`
    gives the client for that MQTT version and `nodes.current` (the same one again keeps paho's
    unacknowledged messages across the reconnect); `down()` runs whenever a connection attempt or a
    connection ends. `nodes` (or one node, `host` and `port`): after a failure the next attempt goes
    to the next node."""
    nodes = nodes or Nodes([(host, port)])
    while not stopping():
        host, port = nodes.current
        link = link_for(versions.version)
        try:
            link.rearm()
            async with link.client:
                if versions.connected():
                    logger.warning(
                        "the broker at %s:%d does not speak MQTT 5: using MQTT 3.1.1 (no response "
                        "topics, correlation data, user properties or message expiry)",
                        host,
                        port,
                    )
                backoff.reset()
                await serve(link)
        except aiomqtt.MqttError as exc:
            if stopping():
                break
            reachable = await tcp_reachable(host, port) if versions.needs_reachability(exc) else True
            if versions.failed(exc, reachable):
                logger.info("the broker did not accept an MQTT 5 connection (%s): trying MQTT 3.1.1", exc)
                continue
            if on_error is not None:
                on_error(exc)
            delay = backoff.delay()
            failed = nodes.label
            if nodes.failed():
                logger.warning(
                    "mqtt connection to %s lost or refused (%s); trying node %s in %.1fs",
                    failed,
                    exc,
                    nodes.label,
                    delay,
                )
            else:
                logger.warning("mqtt connection lost or refused (%s); retrying in %.1fs", exc, delay)
            down()
            await asyncio.sleep(delay)
        finally:
            down()


async def connect_once(
    host: str,
    port: int,
    protocol: str,
    client_for: Callable[[str, float | None], aiomqtt.Client],
    connect_timeout_s: float = 5.0,
) -> tuple[Link, str]:
    """One connection for a command (no retries beyond the version fallback): the connected link
    and its MQTT version. While MQTT 3.1.1 may still be tried, an MQTT 5 CONNECT waits only
    `connect_timeout_s` (`client_for(version, None)` otherwise: the client's own timeout), and one
    unanswered CONNECT is enough to try 3.1.1."""
    versions = VersionChoice(protocol, unanswered_needed=1)
    while True:
        link = Link(client_for(versions.version, connect_timeout_s if versions.can_fall_back else None))
        try:
            await link.client.__aenter__()
        except aiomqtt.MqttError as exc:
            reachable = await tcp_reachable(host, port) if versions.needs_reachability(exc) else True
            if versions.failed(exc, reachable):
                continue
            raise
        versions.connected()
        return link, versions.version


def tls_or_default(tls: ssl.SSLContext | None, use_tls: bool) -> ssl.SSLContext | None:
    """For `mqtts://` without a context the system's CA store verifies the broker."""
    if tls is None and use_tls:
        return ssl.create_default_context()
    return tls

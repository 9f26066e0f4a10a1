"""The one MQTT connection rule (agent.protocol.connection) and what it relies on in aiomqtt.

The version choice and the backoff are pure: their tables are here. The `Link` adapter is tested
against a real Mosquitto, so an aiomqtt upgrade that changes what it relies on (its paho client, its
stale CONNACK future, its disconnect future, its publish callback) fails here first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from agent.devtools.local_broker import LocalBroker
from agent.protocol.broker import redact_url
from agent.protocol.connection import Backoff, Link, PublishRefused, VersionChoice, is_timeout
from tests.conftest import passwd_file

TIMEOUT = aiomqtt.MqttError("Operation timed out")
REFUSED_V5 = MqttConnectError(ReasonCode(2, identifier=0x84))  # "Unsupported protocol version"
NOT_AUTHORIZED = MqttConnectError(ReasonCode(2, identifier=0x87))
DOWN = aiomqtt.MqttError("[Errno 111] Connection refused")

# -- the version choice ---------------------------------------------------------------------------
# (configured, [(error, broker took TCP?) ...], retry-at-once answers, version after)
VERSION_TABLE = [
    ("auto", [(REFUSED_V5, True)], [True], "3.1.1"),  # refused v5: 3.1.1 at once
    ("auto", [(TIMEOUT, True), (TIMEOUT, True)], [False, True], "3.1.1"),  # two unanswered CONNECTs
    ("auto", [(TIMEOUT, False), (TIMEOUT, False), (TIMEOUT, False)], [False] * 3, "5"),  # broker down
    ("auto", [(DOWN, True), (DOWN, True)], [False, False], "5"),  # connection refused: down, not 3.1.1
    ("auto", [(TIMEOUT, True), (DOWN, True), (TIMEOUT, True)], [False] * 3, "5"),  # not in a row
    ("auto", [(NOT_AUTHORIZED, True)], [False], "5"),  # a bad password is not a version problem
    ("auto", [(REFUSED_V5, True), (DOWN, True)], [True, False], "5"),  # 3.1.1 failed: MQTT 5 again
    ("5", [(REFUSED_V5, True), (TIMEOUT, True), (TIMEOUT, True)], [False] * 3, "5"),
    ("3.1.1", [(TIMEOUT, True), (DOWN, True)], [False, False], "3.1.1"),
]


@pytest.mark.parametrize(("configured", "errors", "answers", "after"), VERSION_TABLE)
def test_version_choice(configured, errors, answers, after):
    choice = VersionChoice(configured)
    assert [choice.failed(exc, reachable) for exc, reachable in errors] == answers
    assert choice.version == after


def test_after_a_failed_3_1_1_try_two_more_unanswered_mqtt5_connects_are_needed():
    choice = VersionChoice("auto")
    assert choice.failed(REFUSED_V5)
    assert not choice.failed(DOWN)  # 3.1.1 failed: back to MQTT 5, after the backoff
    assert not choice.failed(TIMEOUT, reachable=True)
    assert choice.failed(TIMEOUT, reachable=True)
    assert choice.version == "3.1.1"


def test_a_connected_version_is_kept_and_a_fallback_is_said_once():
    choice = VersionChoice("auto")
    assert choice.failed(REFUSED_V5)
    assert choice.connected() is True  # the caller logs "does not speak MQTT 5" once
    assert choice.connected() is False
    assert not choice.failed(REFUSED_V5)
    assert choice.version == "3.1.1"
    assert VersionChoice("auto").connected() is False  # MQTT 5 worked: nothing to say


def test_a_command_tries_3_1_1_after_one_unanswered_connect_and_only_then_checks_reachability():
    choice = VersionChoice("auto", unanswered_needed=1)
    assert not choice.needs_reachability(DOWN)
    assert choice.needs_reachability(TIMEOUT)
    assert choice.failed(TIMEOUT, reachable=True)
    assert not choice.needs_reachability(TIMEOUT)  # on 3.1.1 now: nothing to fall back to
    assert is_timeout(TimeoutError()) and not is_timeout(DOWN)


def test_backoff_doubles_up_to_its_limit_with_jitter_and_starts_over_after_a_connection():
    middle = Backoff(0.5, 4.0, rand=lambda: 0.5)  # jitter x1.0
    assert [middle.delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    middle.reset()
    assert middle.delay() == 0.5
    assert Backoff(1.0, 8.0, rand=lambda: 0.0).delay() == 0.5  # jitter spans x0.5 ..
    assert Backoff(1.0, 8.0, rand=lambda: 0.999).delay() == pytest.approx(1.499)  # .. x1.5


# -- redaction ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shown", "expected"),
    [
        ("mqtts://cam-01:cam-01-pw@127.0.0.1:18883", "mqtts://cam-01:***@127.0.0.1:18883"),
        ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
        ("mqtt://only-user@h:1", "mqtt://only-user@h:1"),
        ("u:secret@h:1883", "u:***@h:1883"),  # a URL without a scheme (accepted by the parser)
        ("no status on mqtt://a:p%40ss/w:rd@h:1 (x)", "no status on mqtt://a:***@h:1 (x)"),
        ("at mqtt://a:1@h and mqtts://b:2@k", "at mqtt://a:***@h and mqtts://b:***@k"),
        ("mail me@example.org", "mail me@example.org"),
    ],
)
def test_redact_url(shown, expected):
    assert redact_url(shown) == expected


def test_a_bad_broker_url_is_reported_without_its_password():
    from agent.protocol.broker import BrokerUrlError, parse_broker_url

    with pytest.raises(BrokerUrlError) as caught:
        parse_broker_url("mqtt://cam-01:hunter2-pw@127.0.0.1:0")
    assert "hunter2" not in str(caught.value) and "cam-01:***@" in str(caught.value)


# -- the adapter against a real broker -------------------------------------------------------------
ACL = """user agent
topic readwrite allowed/#
topic read denied/#
"""


@pytest.fixture
def acl_broker(shared_dir: Path):
    """Mosquitto with a password file and an ACL: user `agent` may write `allowed/#`, not `denied/#`."""
    pw = passwd_file(shared_dir, {"agent": "agent-pw"})
    acl = shared_dir / "acl"
    acl.write_text(ACL)
    acl.chmod(0o644)
    with LocalBroker(anonymous=False, extra_config=f"password_file {pw}\nacl_file {acl}\n") as broker:
        yield broker


def _client(port: int, **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username="agent",
        password="agent-pw",
        protocol=aiomqtt.ProtocolVersion.V5,
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_refused_publish_raises_with_its_topic_where_aiomqtt_reports_success(acl_broker):
    """aiomqtt's own publish ignores the PUBACK's reason code (why `Link.publish` exists); the
    adapter sees it, and aiomqtt's publish keeps working beside it."""

    async def main() -> None:
        client = _client(acl_broker.port)
        link = Link(client)
        async with client:
            await client.subscribe("allowed/#", qos=1)
            with pytest.raises(PublishRefused) as caught:
                await link.publish("denied/x", b"1", qos=1)
            assert caught.value.topic == "denied/x" and caught.value.reason == "Not authorized"
            assert "denied/x" in str(caught.value) and "Not authorized" in str(caught.value)
            await client.publish("denied/x", b"2", qos=1)  # aiomqtt: no error (the pinned behaviour)
            await link.publish("allowed/x", b"3", qos=1)
            await client.publish("allowed/y", b"4", qos=1)  # its callback still reaches aiomqtt
            got = []
            async with asyncio.timeout(30):
                async for message in client.messages:
                    got.append((message.topic.value, message.payload))
                    if len(got) == 2:
                        break
            assert got == [("allowed/x", b"3"), ("allowed/y", b"4")]

    asyncio.run(main())


def test_routed_messages_reach_their_callback_and_fail_ends_the_connection(acl_broker):
    async def main() -> None:
        client = _client(acl_broker.port)
        link = Link(client)
        routed: asyncio.Queue[bytes] = asyncio.Queue()
        link.route("allowed/routed", lambda _c, _u, message: routed.put_nowait(bytes(message.payload)))
        async with client:
            await client.subscribe("allowed/routed", qos=1)
            await link.publish("allowed/routed", b"hello", qos=1)
            assert await asyncio.wait_for(routed.get(), 30) == b"hello"
            link.fail(BrokenPipeError("write failed"))
            with pytest.raises(aiomqtt.MqttError, match="Disconnected"):
                async with asyncio.timeout(30):
                    async for _ in client.messages:
                        pass

    asyncio.run(main())


def test_a_reused_client_waits_for_the_next_connack_after_rearm(acl_broker):
    """aiomqtt keeps the last connection's CONNACK future after the connection is lost: entering
    the same client again would return before the broker answered. `rearm` makes it wait: here the
    broker is frozen (it takes TCP connections, answers nothing), so the attempt times out."""

    async def main() -> None:
        client = _client(acl_broker.port, timeout=1.0)
        link = Link(client)
        async with client:
            link.fail(ConnectionResetError("lost"))
            with pytest.raises(aiomqtt.MqttError):
                async for _ in client.messages:
                    pass
        assert client._connected.done(), "aiomqtt now resets its CONNACK future: Link.rearm can go"
        assert acl_broker.proc is not None
        os.kill(acl_broker.proc.pid, signal.SIGSTOP)
        try:
            link.rearm()
            with pytest.raises(aiomqtt.MqttError, match="timed out"):
                async with client:
                    pass
        finally:
            os.kill(acl_broker.proc.pid, signal.SIGCONT)

    asyncio.run(main())


# -- the agent's session and outbox on a refusal ---------------------------------------------------
def test_the_session_logs_a_refused_topic_counts_it_and_the_outbox_drops_it(acl_broker, tmp_path, caplog):
    """A refusal is not transient: the outbox drops the message (also from its disk spool) and goes
    on with the next one, the session names the topic in its log and counts it."""
    from agent.service.config import BrokerConfig
    from agent.service.mqtt_session import MqttSession
    from agent.service.outbox import Outbox, OutboxStore

    caplog.set_level(logging.WARNING, logger="agent.service.mqtt_session")
    cfg = BrokerConfig(host="127.0.0.1", port=acl_broker.port, username="agent", password="agent-pw")
    store_path = tmp_path / "outbox.db"

    async def main() -> tuple[int, int, int]:
        got: asyncio.Queue[str] = asyncio.Queue()
        session = MqttSession(cfg, "acl-agent", "allowed/status", b"{}")
        session.subscribe("allowed/#", lambda m: got.put_nowait(m.topic))
        runner = asyncio.create_task(session.run())
        await asyncio.wait_for(session.connected.wait(), 30)
        outbox = Outbox(session, asyncio.get_running_loop(), OutboxStore(store_path))
        pump = asyncio.create_task(outbox.run())
        outbox.put("denied/result", b"refused")
        outbox.put("allowed/result", b"after it")
        assert await asyncio.wait_for(got.get(), 30) == "allowed/result"
        assert await outbox.flush(30)
        pump.cancel()
        outbox.close()
        await session.stop()
        runner.cancel()
        return session.publishes_refused, outbox.refused, outbox.sent

    refused, outbox_refused, sent = asyncio.run(main())
    assert (refused, outbox_refused, sent) == (1, 1, 1)
    assert "broker refused a publish to denied/result: Not authorized" in caplog.text
    with sqlite3.connect(store_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0  # not sent at next start

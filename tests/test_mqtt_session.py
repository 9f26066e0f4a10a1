"""The agent's MQTT session across reconnects: refusals are seen as refusals, then it comes back."""

from __future__ import annotations

from agent.devtools.local_broker import LocalBroker
from tests.conftest import AgentProcess, passwd_file, wait_for_log


def test_a_password_revoked_across_a_broker_restart_is_a_refusal_then_reconnects(shared_dir, tmp_path):
    """One MQTT client serves the whole session (so paho resends unacknowledged messages itself):
    after a lost connection, its next CONNECT must still wait for the broker's answer. A refusal
    is then reported as one ("Not authorized"), not as a 10 s timeout."""
    users = {"agent": "a-pass", "tester": "t-pass"}
    pw = passwd_file(shared_dir, users)
    broker = LocalBroker(anonymous=False, extra_config=f"password_file {pw}\n")
    config = (
        '[broker]\nusername = "agent"\npassword = "a-pass"\nreconnect_min_s = 0.2\nreconnect_max_s = 0.5\n'
    )
    with broker:
        agent = AgentProcess(broker, tmp_path, "rv1", config).start()
        wait_for_log(agent, "connected to mqtt")
        passwd_file(shared_dir, {"tester": "t-pass"})
        broker.stop()
        broker.start()  # reads the password file without the agent in it
        log = wait_for_log(agent, "Not authorized", timeout=30)
        lines = log.splitlines()
        lost = next(i for i, line in enumerate(lines) if "Disconnected during message iteration" in line)
        next_error = next(line for line in lines[lost + 1 :] if "mqtt connection lost or refused" in line)
        assert "Not authorized" in next_error, "\n".join(lines[lost:])
        assert "Operation timed out" not in log, log[-2000:]
        passwd_file(shared_dir, users)
        broker.reload()
        wait_for_log(agent, "connected to mqtt", count=2, timeout=30)
        assert agent.stop() == 0
    assert "Future exception was never retrieved" not in agent.log()


def test_connect_timeouts_switch_to_3_1_1_only_when_the_broker_took_the_connection():
    """A broker that accepts TCP but leaves MQTT 5 CONNECTs unanswered is a 3.1.1 broker; a broker
    that cannot be reached at all (down, or the network not up at boot) is not."""
    import asyncio

    import aiomqtt

    from agent.devtools.local_broker import LocalBroker
    from agent.protocol.broker import tcp_reachable
    from agent.protocol.connection import VersionChoice
    from agent.service.config import BrokerConfig
    from agent.service.mqtt_session import MqttSession

    with LocalBroker() as broker:
        assert asyncio.run(tcp_reachable("127.0.0.1", broker.port)) is True
        down_port = broker.port
    assert asyncio.run(tcp_reachable("127.0.0.1", down_port, 2.0)) is False  # stopped: refused

    timeout = aiomqtt.MqttError("Operation timed out")
    unreachable = VersionChoice("auto")
    assert not unreachable.failed(timeout, reachable=False)
    assert not unreachable.failed(timeout, reachable=False)
    assert unreachable.version == "5"
    silent = VersionChoice("auto")
    assert not silent.failed(timeout, reachable=True)
    assert silent.failed(timeout, reachable=True)
    assert silent.version == "3.1.1"
    # The agent's session takes its version from that rule.
    assert MqttSession(BrokerConfig(protocol="auto"), "t1", "w", b"").protocol == "5"
    assert MqttSession(BrokerConfig(protocol="3.1.1"), "t2", "w", b"").protocol == "3.1.1"

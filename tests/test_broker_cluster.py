"""Broker clusters (docs/operations.md#broker-clusters), with two real Mosquitto brokers standing in
for two nodes (no bridge: what one node retains the other never sees, as on a cluster that does not
share retained messages), the real agent and the real console.

The console given both nodes moves to the second when the first dies, as the agent does.

The agent is given both nodes: when its node is killed it moves to the other and says so in its
status (`mqtt_broker`). The console converges it to its desired placement from the device's live
status: a placement published while the device was away, whose retained copy its node lost, is
published again, from the console's database, when the device's status shows the older generation."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.devtools.local_broker import LocalBroker
from agent.protocol.schemas import Status
from cloud_console.config import BrokerSettings, ConsoleConfigError, broker_flag
from tests.conftest import AgentProcess, Collector, wait_for_log
from tests.test_console import Client, ConsoleProcess, wait_until

pytestmark = pytest.mark.timeout(240)

DEVICE = "node-hopper"


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LocalBroker, LocalBroker]]:
    """Two nodes shared by the module's tests (no bridge, no persistence)."""
    with LocalBroker() as node_a, LocalBroker() as node_b:
        yield node_a, node_b


@pytest.fixture
def nodes(cluster: tuple[LocalBroker, LocalBroker]) -> tuple[LocalBroker, LocalBroker]:
    """Both nodes running: a node an earlier test killed starts again (empty: no persistence)."""
    for node in cluster:
        if node.proc is None or node.proc.poll() is not None:
            node.start()
    return cluster


@pytest.mark.parametrize(
    ("flag", "expected", "addresses"),
    [
        ("mqtt://b1:1883", {"url": "mqtt://b1:1883", "nodes": []}, [("b1", 1883)]),
        (
            "mqtt://console:pw@b1:1883, mqtt://b2",
            {
                "url": "mqtt://b1:1883",
                "nodes": ["mqtt://b1:1883", "mqtt://b2:1883"],
                "username": "console",
                "password": "pw",
            },
            [("b1", 1883), ("b2", 1883)],
        ),
        (
            "mqtts://b1,mqtts://[::1]:8884",
            {"url": "mqtts://b1:8883", "nodes": ["mqtts://b1:8883", "mqtts://[::1]:8884"]},
            [("b1", 8883), ("::1", 8884)],
        ),
    ],
)
def test_console_broker_flag_takes_the_nodes_of_a_cluster(
    flag: str, expected: dict[str, Any], addresses: list[tuple[str, int]]
) -> None:
    assert broker_flag(flag) == expected
    settings = BrokerSettings.model_validate(broker_flag(flag))
    assert [(a.host, a.port) for a in settings.addresses()] == addresses


@pytest.mark.parametrize(
    ("nodes", "error"),
    [
        (["mqtt://a:1883", "mqtts://b:8883"], "all mqtt:// or all mqtts://"),
        (["mqtt://u:secret@a:1883"], "put credentials in username and password"),
        (["mqtt://a:0"], "port 0"),
    ],
)
def test_console_broker_nodes_that_cannot_be_used(nodes: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error) as raised:
        BrokerSettings(nodes=nodes)
    assert "secret" not in str(raised.value.errors()[0]["msg"])  # type: ignore[attr-defined]
    with pytest.raises(ConsoleConfigError, match="scheme"):
        broker_flag("mqtt://a:1883,http://b")


def online_on(node: LocalBroker) -> Any:
    """A predicate for the device's status: online, on `node`, tenants ready."""
    label = f"127.0.0.1:{node.port}"

    def check(msgs: list[dict[str, Any]]) -> bool:
        last = msgs[-1] if msgs else {}
        tenants = (last.get("placement") or {}).get("tenants") or []
        return bool(
            last.get("online")
            and last.get("mqtt_broker") == label
            and tenants
            and tenants[0]["state"] == "ready"
        )

    return check


def test_the_agent_moves_to_the_next_node_and_the_console_converges_it(
    nodes: tuple[LocalBroker, LocalBroker], tmp_path: Path
) -> None:
    node_a, node_b = nodes
    console = ConsoleProcess(node_b.url, tmp_path).start()
    state = tmp_path / "agent"
    state.mkdir()
    both = f"{node_a.url},{node_b.url}"
    agent = AgentProcess(node_a, state, DEVICE, extra_args=["--broker", both])
    try:
        on_a = Collector(node_a.port, [f"edge/{DEVICE}/status"])
        agent.start()
        on_a.wait_for(online_on(node_a), f"edge/{DEVICE}/status", timeout=90)
        on_a.close()

        # Node A dies: the agent moves to B, says so, and the console (on B) sees it.
        on_b = Collector(node_b.port, [f"edge/{DEVICE}/status"])
        node_a.stop(kill=True)
        on_b.wait_for(online_on(node_b), f"edge/{DEVICE}/status", timeout=90)
        on_b.close()
        wait_for_log(agent, f"connected to mqtt 127.0.0.1:{node_b.port} (node 2 of 2)")
        admin = console.client("admin")
        row = wait_until(
            lambda: next(iter(admin.get(f"/api/devices?id={DEVICE}")["devices"]), None), "the device"
        )
        assert row["broker"] == f"127.0.0.1:{node_b.port}" and row["online"]
        reported = row["applied_generation"]

        # A placement published while the device is away, whose retained copy its node then loses
        # (a restart without persistence: as on a node that never had it).
        agent.stop()
        wait_until(lambda: not admin.get(f"/api/devices?id={DEVICE}")["devices"][0]["online"], "offline")
        tenants = [{"model": "efficientnet-lite0", "backend": "onnxruntime", "threads": 1}]
        status, data = admin.call("PUT", f"/api/devices/{DEVICE}/placement", {"tenants": tenants})
        assert status == 200, data
        wanted = data["generation"]
        assert wanted > reported
        # Node B restarts without the retained copy, and so does the console: it knows the
        # placement from its database only.
        console.stop()
        node_b.restart()
        console.start()
        admin = console.client("admin")
        retained = Collector(node_b.port, [f"edge/{DEVICE}/placement"])
        assert retained.json() == []  # nothing retained: only the console knows what is wanted
        retained.close()

        # Node A is still down: the agent starts, moves to B, reports its old generation, and the
        # console publishes the placement again; the device applies it.
        agent.start()
        on_b = Collector(node_b.port, [f"edge/{DEVICE}/status"])

        def applied(msgs: list[dict[str, Any]]) -> bool:
            last = msgs[-1] if msgs else {}
            placement = last.get("placement") or {}
            return bool(last.get("online")) and placement.get("applied_generation") == wanted

        on_b.wait_for(applied, f"edge/{DEVICE}/status", timeout=120)
        on_b.close()
        assert f"re-published placement generation {wanted} to {DEVICE}" in console.log()
        tracking = admin.get(f"/api/devices/{DEVICE}")["tracking"]
        assert tracking["state"] == "applied", tracking
    finally:
        agent.stop(signal.SIGKILL, timeout=10)
        console.stop()


def test_the_console_moves_to_the_next_node(nodes: tuple[LocalBroker, LocalBroker], tmp_path: Path) -> None:
    """The console given both nodes (`--broker a,b`) starts on the first; when that node dies it
    moves to the second, says so, and sees the devices there."""
    node_a, node_b = nodes
    device = "on-node-b"
    publisher = Collector(node_b.port, [])
    status = Status(online=True, device_id=device, mqtt_broker=f"127.0.0.1:{node_b.port}")
    publisher.publish(f"edge/{device}/status", status.model_dump_json().encode(), retain=True)
    publisher.close()
    console = ConsoleProcess(f"{node_a.url},{node_b.url}", tmp_path).start()
    try:

        def health() -> dict[str, Any]:
            return Client(console.base).call("GET", "/healthz")[1]

        assert health()["mqtt_broker"] == f"127.0.0.1:{node_a.port}"
        admin = console.client("admin")
        assert admin.get(f"/api/devices?id={device}")["devices"] == []  # node A never had it

        node_a.stop(kill=True)
        label_b = f"127.0.0.1:{node_b.port}"
        wait_until(lambda: (h := health())["mqtt_connected"] and h["mqtt_broker"] == label_b, "on node 2")
        assert f"connected to mqtt {label_b} (node 2 of 2)" in console.log()
        row = wait_until(lambda: next(iter(admin.get(f"/api/devices?id={device}")["devices"]), None), device)
        assert row["online"] and row["broker"] == label_b
        assert admin.get("/api/stats")["mqtt_broker"] == label_b
    finally:
        console.stop()
        cleanup = Collector(node_b.port, [])
        cleanup.publish(f"edge/{device}/status", b"", retain=True)
        cleanup.close()

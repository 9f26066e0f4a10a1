"""Broker clusters (docs/operations.md#broker-clusters), with two real Mosquitto brokers standing in
for two nodes (no bridge: what one node retains the other never sees, as on a cluster that does not
share retained messages), the real agent and the real console.

The agent is given both nodes: when its node is killed it moves to the other and says so in its
status (`mqtt_broker`). The console converges it to its desired placement from the device's live
status: a placement published while the device was away, whose retained copy its node lost, is
published again, from the console's database, when the device's status shows the older generation."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from agent.devtools.local_broker import LocalBroker
from tests.conftest import AgentProcess, Collector, wait_for_log
from tests.test_console import ConsoleProcess, wait_until

pytestmark = pytest.mark.timeout(240)

DEVICE = "node-hopper"


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


def test_the_agent_moves_to_the_next_node_and_the_console_converges_it(tmp_path: Path) -> None:
    with LocalBroker() as node_a, LocalBroker() as node_b:
        console = ConsoleProcess(node_b.url, tmp_path).start()
        state = tmp_path / "agent"
        state.mkdir()
        nodes = f"{node_a.url},{node_b.url}"
        agent = AgentProcess(node_a, state, DEVICE, extra_args=["--broker", nodes])
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

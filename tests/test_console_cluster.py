"""Two `edge-console serve` processes on one PostgreSQL and one Mosquitto (docs/operations.md#postgresql):
a login on one is valid on the other, a device's telemetry stored by one shows in the other's fleet
rows, tags and rollouts taken by either count on both and a rollout is stepped once, telemetry
through the shared subscription is stored once, and a process killed mid-run loses nothing: the
other carries on, and drains the killed one's broker session (the messages it held unstored,
unacknowledged, and those queued for it since)."""

from __future__ import annotations

import json
import signal
import time

import pytest
import sqlalchemy as sa

from agent.protocol.schemas import DeviceTelemetry, Percentiles, Status, Telemetry, TenantTelemetry
from cloud_console import auth
from cloud_console.db import open_engine, placements
from cloud_console.simulator import FleetSimulator
from tests.conftest import Collector
from tests.test_console import Client, ConsoleProcess, wait_until

pytestmark = pytest.mark.timeout(300)

DEVICES = 20
PROBE = "probe-1"  # a device of the test's own, alone on the broker while it is probed


def _probe_telemetry(n: int) -> bytes:
    """The probe's n-th telemetry message: figures that say which message it is."""
    tenant = TenantTelemetry(
        model="probe-model",
        backend="onnxruntime",
        device="cpu",
        instances=1,
        state="ready",
        fps=100.0 + n,
        latency_ms=Percentiles(p50=n, p95=10.0 + n, p99=20.0 + n),
        queue_depth=n,
    )
    device = DeviceTelemetry(cpu_percent=1.0, rss_mb=100.0)
    doc = Telemetry(device_id=PROBE, ts=time.time(), interval_s=1.0, tenants=[tenant], device=device)
    return doc.model_dump_json().encode()


def _stored_by_a_shown_on_b(broker, on_a: Client, on_b: Client) -> None:
    """The probe sends one telemetry message at a time (nothing else is publishing telemetry, so the
    processes' counters say which one got it) until process A stored one; then B's fleet row shows
    that message's figures, not those of the last message B received itself."""
    probe = Collector(broker.port, [])
    try:
        probe.publish(
            f"edge/{PROBE}/status",
            Status(online=True, device_id=PROBE).model_dump_json().encode(),
            retain=True,
        )
        wait_until(lambda: on_b.get(f"/api/devices?id={PROBE}")["devices"], "the probe at B")

        def telemetry_at(client: Client) -> int:
            return int(client.get("/api/stats")["by_kind"]["telemetry"])

        last_at_a = None
        for n in range(1, 41):
            counts = telemetry_at(on_a), telemetry_at(on_b)
            probe.publish(f"edge/{PROBE}/telemetry", _probe_telemetry(n))
            after = wait_until(
                lambda c=counts: (
                    (now := (telemetry_at(on_a), telemetry_at(on_b)))[0] + now[1] > c[0] + c[1] and now
                ),
                f"probe message {n} handled",
            )
            if after[0] > counts[0]:  # A got it; B holds an earlier message's figures, or none
                last_at_a = n
                break
        assert last_at_a is not None, "the broker never gave process A a probe message"

        def figures_at_b() -> dict | None:
            rows = on_b.get(f"/api/devices?id={PROBE}")["devices"]
            row = rows[0] if rows else {}
            return row if row.get("fps") == 100.0 + last_at_a else None

        row = wait_until(figures_at_b, f"probe message {last_at_a} (stored by A) in B's row", timeout=30)
        assert (row["p95_ms"], row["queue_depth"]) == (10.0 + last_at_a, last_at_a)
        probe.publish(f"edge/{PROBE}/status", b"", retain=True)  # the probe leaves the fleet
        wait_until(lambda: not on_b.get(f"/api/devices?id={PROBE}")["devices"], "the probe gone at B")
    finally:
        probe.close()


def _live_telemetry(client: Client, device_id: str, count: int) -> list[float]:
    """The ts of the first `count` telemetry events a device page's event stream gets, once the
    stream has started (a page opened now)."""
    import urllib.request

    req = urllib.request.Request(f"{client.base}/api/events?device={device_id}")
    seen: list[float] = []
    with client.opener.open(req, timeout=60) as stream:
        event = None
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "telemetry":
                seen.append(json.loads(line[6:])["ts"])
                if len(seen) == count:
                    return seen[1:]  # the first may have come before the live subscription
    return seen


def test_two_processes_share_logins_and_store_each_message_once(broker, postgres, tmp_path):
    database = postgres.fresh_database()
    config = tmp_path / "console.toml"
    config.write_text(
        "shared_group_timeout_s = 4\n"
        f'[storage]\ndatabase = "{database}"\nflush_interval_s = 2.0\n'
        f'[[users]]\nname = "ops"\npassword_hash = "{auth.hash_password("ops-password")}"\nrole = "admin"\n'
    )
    sim = FleetSimulator(broker.host, broker.port, DEVICES, interval_s=0.5, id_prefix="cl", telemetry_qos=1)
    consoles: list[ConsoleProcess] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            args = ["--config", str(config), "--shared-group", "console"]
            consoles.append(ConsoleProcess(broker.url, tmp_path / name, args).start())
        a, b = consoles

        # A login on A is a session on B (the session row and the secret live in the database).
        on_a = Client(a.base).login("ops", "ops-password")
        on_b = Client(b.base)
        for cookie in on_a.jar:
            on_b.jar.set_cookie(cookie)
        on_b.csrf = on_a.csrf
        assert on_b.get("/api/session")["user"] == "ops"

        # Telemetry A stored shows in B's fleet rows (docs/console.md#several-console-processes).
        _stored_by_a_shown_on_b(broker, on_a, on_b)
        sim.start()

        def both_ingest() -> list[dict[str, int]] | None:
            stats = [on_a.get("/api/stats"), on_b.get("/api/stats")]
            return stats if all(s["by_kind"]["telemetry"] >= 20 for s in stats) else None

        wait_until(both_ingest, "telemetry at both processes")
        # Status is followed by each process: both know the whole fleet.
        wait_until(lambda: on_b.get("/api/stats")["devices"] == DEVICES, "every device at B")
        # Tags set through B select devices on A; a rollout created through A and approved through
        # B is stepped by one process (the lease holder) and each device gets its placement once.
        canaries = sorted(sim.device_map)[:2]
        for device_id in canaries:
            assert on_b.call("PUT", f"/api/devices/{device_id}/tags", {"tags": {"ring": "canary"}})[0] == 200
        wait_until(
            lambda: on_a.get("/api/selectors/match?selector=ring=canary")["devices"] == canaries,
            "B's tags at A",
        )
        spec = {
            "selector": "ring=canary",
            "change": {"model": "efficientnet-lite0", "set": {"version": "1.0.0"}},
            "waves": ["1", "all"],
            "promotion": "manual",
            "gates": {"soak_s": 0.5, "max_p95_factor": 3.0, "min_throughput_ratio": 0.3},
        }
        status, rollout = on_a.call("POST", "/api/rollouts", spec)
        assert status == 201, rollout
        path = f"/api/rollouts/{rollout['id']}"
        wait_until(lambda: on_b.get(path)["state"] == "waiting_approval", "wave 1, seen at B")
        assert on_b.call("POST", f"{path}/approve")[0] == 200
        wait_until(lambda: on_a.get(path)["state"] == "completed", "the rollout completed, seen at A")
        # A device page open on B shows every telemetry message of its device live, also those that
        # A stores.
        watched = sorted(sim.device_map)[0]
        shown = _live_telemetry(on_b, watched, count=8)
        engine = open_engine(database)

        def stored_of_watched() -> list[float] | None:
            with engine.connect() as conn:
                found = conn.scalars(
                    sa.text("SELECT ts FROM host_metrics WHERE device_id = :d AND ts BETWEEN :a AND :b"),
                    {"d": watched, "a": min(shown), "b": max(shown)},
                ).all()
            return sorted(found) if max(shown) in found else None

        stored_ts = wait_until(stored_of_watched, "the watched device's messages stored")
        assert sorted(shown) == stored_ts  # every message stored (by A or B) was shown on B

        a.proc.send_signal(signal.SIGKILL)  # mid-run, with messages in memory and in flight
        a.proc.wait(30)
        before = on_b.get("/api/stats")["by_kind"]["telemetry"]
        wait_until(
            lambda: on_b.get("/api/stats")["by_kind"]["telemetry"] >= before + 3 * DEVICES, "B carrying on"
        )
        assert on_b.get("/api/session")["user"] == "ops"  # nobody is logged out by the loss of A

        sim.stop()  # every telemetry publish acknowledged by the broker
        sent = sim.telemetry_sent

        def stored() -> int | None:
            with engine.connect() as conn:
                count = int(
                    conn.scalar(
                        sa.text("SELECT count(*) FROM host_metrics WHERE device_id != :p"), {"p": PROBE}
                    )
                    or 0
                )
            return count if count >= sent else None

        wait_until(stored, f"all {sent} telemetry messages in the database", timeout=60)
        with engine.connect() as conn:
            rows = int(
                conn.scalar(sa.text("SELECT count(*) FROM host_metrics WHERE device_id != :p"), {"p": PROBE})
                or 0
            )
            distinct = int(
                conn.scalar(
                    sa.text(
                        "SELECT count(*) FROM (SELECT DISTINCT device_id, ts FROM host_metrics"
                        " WHERE device_id != :p) d"
                    ),
                    {"p": PROBE},
                )
                or 0
            )
        assert rows == distinct == sent  # each message stored once, none lost
        with engine.connect() as conn:
            placed = conn.scalars(
                sa.select(placements.c.device_id).where(placements.c.user == f"rollout {rollout['id']}")
            ).all()
        assert sorted(placed) == canaries
        engine.dispose()
    finally:
        sim.stop()
        for console in consoles:
            console.stop()

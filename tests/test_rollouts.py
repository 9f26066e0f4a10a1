"""Staged rollouts end to end (docs/fleet.md#rollouts): the console (a subprocess, as in production),
a real Mosquitto, and simulated devices that install delivered versions and can be faulty.

A good version reaches every targeted device in waves (one device offline meanwhile gets it when it
is back); a version that fails to load and one that answers errors each stop at wave 1 and are rolled
back by themselves; tags and selectors filter the fleet; a rollout waiting for approval survives a
console restart and finishes from the CLI. Soak times are a second, so this runs in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.devtools.local_broker import LocalBroker
from bench.rollout import tar_gz, tiny_model
from cloud_console import rollout_cli
from cloud_console.simulator import FleetSimulator, SimFault
from tests.test_console import ConsoleProcess, wait_until
from tests.test_delivery import raw

pytestmark = pytest.mark.timeout(240)

M = "efficientnet-lite0"
DEVICES = 12  # profiles rotate x86, jetson, rpi, gpu-server; sites rotate north, south, east
FAST = {"soak_s": 1.0, "max_p95_factor": 3.0, "min_throughput_ratio": 0.3}


class Fleet:
    def __init__(self, console: ConsoleProcess, sim: FleetSimulator, token: str) -> None:
        self.console, self.sim, self.token = console, sim, token
        self.admin = console.client("admin")

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import json

        data = None if body is None else json.dumps(body).encode()
        return raw(self.console.base, method, path, data, self.token, "application/json")

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        status, data = self.api("GET", f"/api/rollouts/{rollout_id}")
        assert status == 200, data
        return data

    def wait_state(self, rollout_id: str, state: str, timeout: float = 90) -> dict[str, Any]:
        return wait_until(
            lambda: (r := self.rollout(rollout_id))["state"] == state and r, f"rollout {state}", timeout
        )

    def lite0(self, device_id: str) -> list[tuple[str | None, str]]:
        """(version, state) of each efficientnet-lite0 tenant the console sees on the device."""
        status = self.admin.get(f"/api/devices/{device_id}")["status"]
        return [(t.get("version"), t["state"]) for t in status["placement"]["tenants"] if t["model"] == M]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("rollouts")
    faults = (SimFault("load", 1.0, "9.0.0", M), SimFault("errors", 1.0, "9.1.0", M))
    with LocalBroker() as broker:
        sim = FleetSimulator(
            broker.host, broker.port, DEVICES, interval_s=0.3, per_connection=6, faults=faults
        )
        sim.start()
        console = ConsoleProcess(broker.url, workdir).start()
        try:
            admin = console.client("admin")
            token = admin.call("POST", "/api/tokens", {"name": "rollouts"})[1]["token"]
            for version in ("2.0.0", "9.0.0", "9.1.0"):
                archive = tar_gz(tiny_model(workdir, version))
                assert raw(console.base, "POST", "/api/models", archive, token)[0] == 201
            wait_until(lambda: admin.get("/api/devices")["stats"]["online"] == DEVICES, "every device online")
            yield Fleet(console, sim, token)
        finally:
            console.stop()
            sim.stop()


def create(fleet: Fleet, selector: str, version: str, **extra: Any) -> dict[str, Any]:
    body = {
        "selector": selector,
        "change": {"model": M, "set": {"version": version}},
        "waves": ["1", "50%", "all"],
        "gates": FAST,
        **extra,
    }
    status, data = fleet.api("POST", "/api/rollouts", body)
    assert status == 201, data
    return data


def test_good_versions_go_out_in_waves_and_faulty_ones_are_rolled_back(fleet: Fleet):
    fleet.sim.set_online("sim-0009", False)
    wait_until(lambda: not fleet.admin.get("/api/devices/sim-0009")["summary"]["online"], "sim-0009 offline")
    good = create(fleet, "site=north", "2.0.0")
    broken = create(fleet, "site=south", "9.0.0")
    erring = create(fleet, "site=east", "9.1.0")
    assert [len(w["devices"]) for w in good["wave_list"]] == [1, 1, 2]
    assert good["wave_list"][-1]["devices"][-1]["device_id"] == "sim-0009"  # canaries are online ones
    status, clash = fleet.api(
        "POST", "/api/rollouts", {"selector": "id=sim-0000", "change": {"model": M, "set": {}}}
    )
    assert status == 422 and "another running rollout" in clash["detail"]

    # A version that fails to load: stopped at wave 1, its one device restored, nobody else touched.
    done = fleet.wait_state(broken["id"], "rolled_back")
    canary = done["wave_list"][0]["devices"][0]
    assert done["wave_list"][0]["state"] == "failed"
    assert "9.0.0 failed to load" in done["reason"] and canary["state"] == "rolled_back"
    assert [w["state"] for w in done["wave_list"][1:]] == ["cancelled", "cancelled"]
    assert fleet.lite0(canary["device_id"]) == [("1.0.0", "ready")]
    for device in (d for w in done["wave_list"][1:] for d in w["devices"]):
        assert device["state"] == "cancelled" and device["generation"] is None
        assert fleet.lite0(device["device_id"]) == [(None, "ready")]

    # A version that answers errors: loads fine, fails its gate after the soak, with the figure.
    done = fleet.wait_state(erring["id"], "rolled_back")
    canary = done["wave_list"][0]["devices"][0]
    assert canary["figures"]["error_rate"] >= 0.2 and "error answers" in done["reason"]
    assert fleet.lite0(canary["device_id"]) == [("1.0.0", "ready")]

    # The good one completes; the device that was offline gets it once it is back.
    done = fleet.wait_state(good["id"], "completed")
    last = done["wave_list"][-1]["devices"]
    assert [(d["device_id"], d["state"], d["deferred"]) for d in last][-1] == ("sim-0009", "targeted", True)
    for device_id in ("sim-0000", "sim-0003", "sim-0006"):
        assert fleet.lite0(device_id) == [("2.0.0", "ready")]
    fleet.sim.set_online("sim-0009", True)
    wait_until(
        lambda: fleet.rollout(good["id"])["counts"] == {"succeeded": 4}, "sim-0009 to get 2.0.0 on its return"
    )
    assert fleet.lite0("sim-0009") == [("2.0.0", "ready")]

    status, text = fleet.console.client("admin").call("GET", "/metrics")
    assert status == 200
    assert 'edge_fleet_rollouts{state="rolled_back"} 2.0' in text
    assert f'edge_fleet_rollout_rollback_seconds{{rollout="{broken["id"]}"}}' in text
    assert 'edge_fleet_rollout_placements_total{purpose="rollback"} 2.0' in text
    log = fleet.console.log()
    assert f"rollout {broken['id']}: wave 1 failed" in log and f"rollout {good['id']}: completed" in log


def test_tags_and_selectors_pick_devices(fleet: Fleet):
    status, data = fleet.api("PUT", "/api/devices/sim-0001/tags", {"tags": {"ring": "canary", "site": ""}})
    assert status == 200 and data["tags"] == {"ring": "canary", "hw": "jetson"}
    rows = fleet.admin.get("/api/devices?selector=ring=canary")["devices"]
    assert [r["device_id"] for r in rows] == ["sim-0001"]
    rows = fleet.admin.get("/api/devices?selector=site=north,hw!=x86-openvino")["devices"]
    assert [r["device_id"] for r in rows] == ["sim-0003", "sim-0006", "sim-0009"]
    assert fleet.admin.call("GET", "/api/devices?selector=Site=x")[0] == 422
    status, data = fleet.api("GET", "/api/selectors/match?selector=!site")
    assert data["devices"] == ["sim-0001"]
    viewer = fleet.console.client("viewer")
    assert viewer.call("PUT", "/api/devices/sim-0002/tags", {"tags": {"ring": "x"}})[0] == 403
    assert fleet.api("PUT", "/api/devices/sim-0002/tags", {"tags": {"Bad": "x"}})[0] == 422
    assert fleet.api("PUT", "/api/devices/sim-0001/tags", {"tags": {}})[1]["tags"]["site"] == "south"
    # The fleet move narrowed by a selector: two other Raspberry Pis run the model on the Coral too.
    move = {"model": M, "from_backend": "edgetpu", "to_backend": "tflite", "selector": "id=sim-0002"}
    status, moved = fleet.api("POST", "/api/fleet/move", move)
    assert status == 200 and [p["device_id"] for p in moved["published"]] == ["sim-0002"], moved


def test_a_rollout_waiting_for_approval_survives_a_console_restart(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
):
    rollout = create(fleet, "hw=jetson", "2.0.0", waves=["1", "all"], promotion="manual")
    fleet.wait_state(rollout["id"], "waiting_approval")
    before = fleet.rollout(rollout["id"])
    fleet.console.stop()
    fleet.console.start()
    fleet.admin = fleet.console.client("admin")
    after = fleet.rollout(rollout["id"])
    assert after["state"] == "waiting_approval" and after["timeline"] == before["timeline"]
    assert after["wave_list"][0]["devices"] == before["wave_list"][0]["devices"]
    cli = ["rollout", "--url", fleet.console.base, "--token", fleet.token]
    assert rollout_cli.cmd_rollout(_args([*cli, "approve", rollout["id"]])) == 0
    assert capsys.readouterr().out.strip() == f"{rollout['id']}: running"
    fleet.wait_state(rollout["id"], "completed")
    for device_id in ("sim-0001", "sim-0005", "sim-0009"):
        assert fleet.lite0(device_id) == [("2.0.0", "ready")]
    assert rollout_cli.cmd_rollout(_args([*cli, "status", rollout["id"]])) == 0
    assert f"{rollout['id']}  completed  wave 2/2" in capsys.readouterr().out
    assert rollout_cli.cmd_rollout(_args([*cli, "resume", rollout["id"]])) == 1
    assert "cannot resume a rollout that is completed" in capsys.readouterr().err


def _args(argv: list[str]) -> Any:
    from cloud_console.cli import build_parser

    return build_parser().parse_args(argv)


def test_the_simulator_refuses_a_version_it_lacks(tmp_path: Path):
    import random

    from cloud_console.simulator import PROFILES, SimDevice

    device = SimDevice("x", PROFILES[0], random.Random(1))
    device.installed = {M: ["1.0.0"]}
    device.apply(b'{"generation": 1, "tenants": [{"model": "efficientnet-lite0", "version": "3"}]}', 0.0)
    assert "efficientnet-lite0 3 is not installed" in device.errors[-1]


@pytest.mark.slow
def test_real_agents_rolled_forward_and_back_answer_every_frame_once(
    agent_factory, broker, collector, tmp_path
):
    """Two real agents (tagged in agent.toml) get 1.1.0 in two waves and then a rollback, while each
    gets 30 frames a second: every frame is answered exactly once, by 1.1.0 in between and by the
    bundled 1.0.0 after the rollback."""
    import base64
    import json
    import threading
    import time

    from tests.conftest import sample
    from tests.test_delivery import NAME, new_version, tar_of

    console = ConsoleProcess(broker.url, tmp_path).start()
    try:
        admin = console.client("admin")
        token = admin.call("POST", "/api/tokens", {"name": "fleet", "role": "admin"})[1]["token"]
        devices = ["edge-a", "edge-b"]
        for device in devices:
            config = (
                'tags = {site = "lab"}\n[metrics]\ntelemetry_interval_s = 0.5\n'
                f'[models]\nconsole_url = "{console.base}"\ntoken = "{token}"\n'
            )
            agent_factory(device, config).start().wait_ready()
        rows = wait_until(
            lambda: len(r := admin.get("/api/devices?selector=site=lab")["devices"]) == 2 and r,
            "tagged agents",
        )
        assert [r["device_id"] for r in rows] == devices
        status, _ = raw(
            console.base, "POST", "/api/models", tar_of(new_version(tmp_path, "1.1.0", "v110 ")), token
        )
        assert status == 201
        answers = collector([f"edge/{d}/result" for d in devices])
        frame = base64.b64encode(sample("cat.jpg")).decode()
        sent: list[str] = []
        stop = threading.Event()

        def stream() -> None:
            n, next_at = 0, time.monotonic()
            while not stop.is_set():
                for device in devices:
                    rid = f"{device}-{n}"
                    answers.publish(
                        f"edge/{device}/infer/{NAME}",
                        json.dumps({"request_id": rid, "image_b64": frame}).encode(),
                    )
                    sent.append(rid)
                n += 1
                next_at += 1 / 30
                stop.wait(max(0.0, next_at - time.monotonic()))

        def labels(device: str, since: int) -> list[str]:
            return [
                m["top"][0]["label"] for m in answers.json(f"edge/{device}/result")[since:] if m.get("top")
            ]

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        try:
            body = {
                "selector": "site=lab",
                "change": {"model": NAME, "set": {"version": "1.1.0"}},
                "waves": ["1", "all"],
                # Gates wide open: this is about frames while devices switch, on a busy test machine.
                "gates": {
                    "soak_s": 3.0,
                    "max_error_rate": 1.0,
                    "max_p95_factor": 100.0,
                    "min_throughput_ratio": 0.0,
                },
            }
            status, rollout = raw(
                console.base, "POST", "/api/rollouts", json.dumps(body).encode(), token, "application/json"
            )
            assert status == 201, rollout
            done = wait_until(
                lambda: (
                    (r := admin.get(f"/api/rollouts/{rollout['id']}"))["state"]
                    in ("completed", "rolled_back")
                    and r
                ),
                "the rollout to finish",
                timeout=180,
            )
            assert done["state"] == "completed", done["reason"]
            marks = {d: len(answers.json(f"edge/{d}/result")) for d in devices}
            wait_until(
                lambda: all(
                    labels(d, marks[d])[-5:] and all(x.startswith("v110 ") for x in labels(d, marks[d])[-5:])
                    for d in devices
                ),
                "answers from 1.1.0",
            )
            assert admin.call("POST", f"/api/rollouts/{rollout['id']}/rollback")[0] == 200
            wait_until(
                lambda: admin.get(f"/api/rollouts/{rollout['id']}")["state"] == "rolled_back",
                "the rollback",
                timeout=180,
            )
            marks = {d: len(answers.json(f"edge/{d}/result")) for d in devices}
            wait_until(
                lambda: all(
                    labels(d, marks[d])[-5:]
                    and not any(x.startswith("v110 ") for x in labels(d, marks[d])[-5:])
                    for d in devices
                ),
                "answers from 1.0.0 again",
            )
        finally:
            stop.set()
            streamer.join(10)
        expected = set(sent)

        def all_answered(_msgs: list[dict[str, Any]]) -> bool:
            return expected <= {
                m.get("request_id") for d in devices for m in answers.json(f"edge/{d}/result")
            }

        answers.wait_for(all_answered, f"edge/{devices[0]}/result", timeout=180)
        ids = [m.get("request_id") for d in devices for m in answers.json(f"edge/{d}/result")]
        assert len(ids) == len(set(ids)) == len(expected) >= 300
        errors = [m["error"] for d in devices for m in answers.json(f"edge/{d}/result") if "error" in m]
        assert not [e for e in errors if e["code"] != "overloaded"], errors[:3]
    finally:
        assert console.stop() == 0, console.log()[-2000:]

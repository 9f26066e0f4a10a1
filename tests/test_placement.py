"""Dynamic placement against a real Mosquitto: live moves, refusals, restarts, auto placement."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.commands.client import publish_placement
from agent.placement.auto import choose, resource_of
from tests.conftest import CAT_CLASSES, Collector, sample, wait_for_log

pytestmark = pytest.mark.timeout(240)


def place(broker, device_id, tenants, generation):
    return asyncio.run(
        publish_placement(broker.url, device_id, {"generation": generation, "tenants": tenants})
    )


def lite0(backend="onnxruntime", device="cpu", instances=1, **extra):
    return {
        "model": "efficientnet-lite0",
        "backend": backend,
        "device": device,
        "instances": instances,
        **extra,
    }


class Streamer(threading.Thread):
    """Publishes frames at a steady rate with unique request ids until stopped."""

    def __init__(self, collector: Collector, device_id: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.c, self.topic, self.interval = collector, f"edge/{device_id}/infer", 1.0 / rate
        self.sent: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        image = sample("cat.jpg")
        i = 0
        while not self.stop.is_set():
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = f"s{i}".encode()
            self.c.client.publish(self.topic, image, qos=1, properties=props)
            self.sent.append(f"s{i}")
            i += 1
            time.sleep(self.interval)  # pacing


def test_moves_while_streaming_every_frame_answered_exactly_once(agent_factory, collector, broker):
    agent = agent_factory("mv1").start()
    agent.wait_ready()
    c = collector(["edge/mv1/result"])
    streamer = Streamer(c, "mv1", rate=30)
    streamer.start()
    moves = [
        lite0("openvino", "CPU"),
        lite0("onnxruntime", "cpu", instances=2),
        lite0("openvino", "cpu", instances=2, batch={"max_size": 4, "max_delay_ms": 5}),
        lite0("onnxruntime", "CPU", instances=1),
    ]
    for generation, tenant in enumerate(moves, start=1):
        before = len(c.json("edge/mv1/result"))
        applied, status = place(broker, "mv1", [tenant], generation)
        assert applied, status

        def new_tenant_serves(results, before=before, tenant=tenant) -> bool:
            # Consecutive moves alternate the backend, so answers from this one come from the new
            # tenant; with two instances, both of them answer.
            mine = [
                r["tenant"]
                for r in results[before:]
                if r.get("tenant", {}).get("backend") == tenant["backend"]
            ]
            return len(mine) >= 10 and {t["instance"] for t in mine} == set(range(tenant["instances"]))

        c.wait_for(new_tenant_serves, "edge/mv1/result", timeout=60)  # streaming on the new tenant
    streamer.stop.set()
    streamer.join()
    sent = set(streamer.sent)
    results = c.wait_for(lambda r: {x["request_id"] for x in r} >= sent, "edge/mv1/result", timeout=60)
    counts = Counter(r["request_id"] for r in results)
    assert set(counts) == sent and set(counts.values()) == {1}, "every frame answered exactly once"
    errors = [r for r in results if "error" in r]
    assert not errors, errors[:3]
    assert {r["tenant"]["backend"] for r in results} == {"onnxruntime", "openvino"}
    assert {r["tenant"]["instance"] for r in results} == {0, 1}
    final = agent.wait_ready()
    assert final["placement"]["applied_generation"] == 4
    assert [(t["backend"], t["instances"]) for t in final["placement"]["tenants"]] == [("onnxruntime", 1)]


def wait_status(c: Collector, device_id: str, predicate, timeout=30.0):
    return c.wait_for(lambda r: bool(r) and predicate(r[-1]), f"edge/{device_id}/status", timeout)[-1]


BAD_DOCUMENTS = [
    (b"not json at all", "invalid json"),
    (json.dumps({"generation": "seven", "tenants": []}).encode(), "generation"),
    (json.dumps({"generation": 20, "tenants": [lite0(instances=1000)]}).encode(), "instances"),
    (json.dumps({"generation": 20, "tenants": [lite0(instances=-1)]}).encode(), "instances"),
    (json.dumps({"generation": 20, "tenants": [{"model": "../../etc/passwd"}]}).encode(), "model"),
    (json.dumps({"generation": 20, "tenants": [{"model": "/etc/passwd"}]}).encode(), "model"),
    (json.dumps({"generation": 20, "tenants": [{"model": "no-such-model"}]}).encode(), "unknown model"),
    (json.dumps({"generation": 20, "tenants": [lite0(backend="tensorflow")]}).encode(), "unknown backend"),
    (json.dumps({"generation": 20, "tenants": [lite0(device="tpu:9")]}).encode(), "no device"),
    (json.dumps({"generation": 3, "tenants": [lite0("openvino", "CPU")]}).encode(), "older"),
    (json.dumps({"generation": 20, "tenants": [lite0(), lite0()]}).encode(), "twice"),
    (json.dumps({"generation": 20, "tenants": [lite0()], "extra": 1}).encode(), "extra"),
]


def test_refused_documents_leave_the_serving_placement_untouched(agent_factory, collector, broker):
    agent = agent_factory("rf1").start()
    agent.wait_ready()
    applied, _ = place(broker, "rf1", [lite0("openvino", "CPU")], 10)
    assert applied
    c = collector(["edge/rf1/status", "edge/rf1/result"])
    for payload, needle in BAD_DOCUMENTS:
        before = len(c.json("edge/rf1/status"))
        c.publish("edge/rf1/placement", payload, retain=True)
        status = c.wait_for(
            lambda r, b=before, needle=needle: (
                len(r) > b
                and (r[-1]["placement"].get("refused") or {}).get("ts", 0) > 0
                and needle in r[-1]["placement"]["refused"]["reason"].lower()
            ),
            "edge/rf1/status",
        )[-1]
        tenants = status["placement"]["tenants"]
        assert [(t["backend"], t["state"]) for t in tenants] == [("openvino", "ready")], needle
        assert status["placement"]["applied_generation"] == 10
        c.publish("edge/rf1/infer", sample("cat.jpg"))
    results = c.wait_for(lambda r: len(r) >= len(BAD_DOCUMENTS), "edge/rf1/result")
    assert all(r["tenant"]["backend"] == "openvino" and r["top"][0]["index"] in CAT_CLASSES for r in results)
    assert not (agent.state_dir / "passwd").exists()


def test_restart_while_broker_down_serves_saved_placement_then_retained_wins(agent_factory, broker):
    agent = agent_factory("rs1", config="[broker]\nreconnect_max_s = 1.0\n").start()
    agent.wait_ready()
    assert place(broker, "rs1", [lite0("openvino", "CPU")], 5)[0]
    assert agent.stop() == 0
    broker.stop()
    agent.start()  # broker is down: the saved placement must load anyway
    wait_for_log(agent, "placement generation 5 applied (saved)")
    assert "placement generation 5 applied (saved)" in agent.log()
    broker.start()  # empty: no retained state survived the restart
    status = agent.wait_ready(timeout=60)  # back online by itself, already serving the saved placement
    assert status["placement"]["applied_generation"] == 5
    c = Collector(broker.port, ["edge/rs1/result"])
    try:
        c.publish("edge/rs1/infer", sample("cat.jpg"))
        first = c.wait_for(lambda r: len(r) >= 1, "edge/rs1/result", timeout=60)[0]
        assert first["tenant"]["backend"] == "openvino"
        applied, status = place(broker, "rs1", [lite0("onnxruntime", "cpu")], 6)
        assert applied, status
        c.publish("edge/rs1/infer", sample("cat.jpg"))
        second = c.wait_for(lambda r: len(r) >= 2, "edge/rs1/result", timeout=60)[1]
        assert second["tenant"]["backend"] == "onnxruntime"
    finally:
        c.close()


def test_place_cli_applies_and_reports_refusals(agent_factory, broker):
    agent = agent_factory("pc1").start()
    agent.wait_ready()
    base = [sys.executable, "-m", "agent", "place", "--broker", broker.url, "--device-id", "pc1"]
    done = subprocess.run(
        [
            *base,
            "--model",
            "efficientnet-lite0",
            "--backend",
            "openvino",
            "--device",
            "cpu",
            "--instances",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "applied generation 1" in done.stdout and "openvino:CPU x2" in done.stdout
    done = subprocess.run(
        [*base, "--model", "efficientnet-lite0", "--backend", "nosuch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "refused" in done.stdout and "unknown backend" in done.stdout


def test_place_cli_keeps_the_other_models_whole_and_reports_a_failed_move(agent_factory, broker, tmp_path):
    agent = agent_factory("pc2").start()
    agent.wait_ready()
    base = [sys.executable, "-m", "agent", "place", "--broker", broker.url, "--device-id", "pc2"]

    def place(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)

    doc = tmp_path / "p.json"
    doc.write_text(
        json.dumps(
            {
                "tenants": [
                    {
                        "model": "efficientnet-lite0",
                        "backend": "openvino",
                        "device": "CPU",
                        "precision": "fp32",
                    }
                ]
            }
        )
    )
    done = place("--file", str(doc))
    assert done.returncode == 0, done.stdout + done.stderr
    # A move the device cannot make (no Edge TPU here): applied, the old tenant keeps serving, exit 1.
    done = place("--model", "efficientnet-lite0", "--backend", "edgetpu", "--device", "usb")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed to start: efficientnet-lite0" in done.stdout
    # The next --model document keeps lite0 as it serves (once, with its precision), adds lite1.
    done = place("--model", "efficientnet-lite1", "--backend", "onnxruntime")
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "agent", "status", "--broker", broker.url, "--device-id", "pc2"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    tenants = {t["model"]: t for t in status["placement"]["tenants"] if t["state"] != "draining"}
    assert tenants["efficientnet-lite0"]["backend"] == "openvino"
    assert tenants["efficientnet-lite0"]["precision"] == "fp32"
    assert tenants["efficientnet-lite1"]["state"] == "ready"


def test_auto_placement_profiles_and_explains(agent_factory, broker):
    agent = agent_factory("au1").start()
    agent.wait_ready()
    tenants = [
        {"model": "efficientnet-lite0", "backend": "auto", "device": "auto"},
        {"model": "efficientnet-lite1", "backend": "auto", "device": "auto"},
    ]
    applied, status = place(broker, "au1", tenants, 1)
    assert applied, status
    placed = {t["model"]: t for t in status["placement"]["tenants"]}
    for t in placed.values():
        auto = t["auto"]
        assert {"onnxruntime:cpu", "openvino:CPU"} <= set(auto["candidates"])
        assert all(v > 0 for v in auto["candidates"].values())
        assert (t["backend"], t["device"]) == (auto["backend"], auto["device"])
    # Two auto tenants share the CPU: the shortlisted pairs were run side by side and the best
    # measured total won, whatever the solo figures said.
    together = placed["efficientnet-lite0"]["auto"]["together"]
    assert 2 <= len(together) <= 4
    chosen = " + ".join(
        f"{m}@{placed[m]['backend']}:{placed[m]['device']}"
        for m in ("efficientnet-lite0", "efficientnet-lite1")
    )
    assert together[chosen] == max(together.values())
    with sqlite3.connect(agent.state_dir / "profiles.db") as db:
        # One cached profile per model and candidate (a runtime without the artifact profiles as 0).
        assert db.execute("SELECT count(*) FROM profiles WHERE fps > 0").fetchone()[0] >= 4
        assert db.execute("SELECT count(*) FROM joint_profiles").fetchone()[0] == len(together)


def test_choose_spreads_over_separate_accelerators_and_not_over_one_cpu():
    fast_gpu = {("torch", "cuda:0"): 1000.0, ("onnxruntime", "cpu"): 200.0}
    # Two models that both prefer the GPU: spreading wins (1000 + 200 > 1000/2 + 1000/2? no: 1200 > 1000).
    assert sorted(choose({"a": fast_gpu, "b": fast_gpu}).values()) == [
        ("onnxruntime", "cpu"),
        ("torch", "cuda:0"),
    ]
    # Two CPU backends are one resource: no gain from spreading, each takes its fastest.
    cpu_only = {("onnxruntime", "cpu"): 150.0, ("openvino", "CPU"): 300.0}
    assert set(choose({"a": cpu_only, "b": cpu_only}).values()) == {("openvino", "CPU")}
    assert resource_of("openvino", "CPU") == resource_of("onnxruntime", "cpu") == "cpu"
    assert resource_of("onnxruntime", "tensorrt:1") == resource_of("torch", "cuda:1")


def test_a_failed_move_survives_a_restart_with_the_model_still_served(agent_factory, broker, collector):
    """The saved placement is what serves: after a move that failed (no Edge TPU here) and a restart,
    the model is still answered by the tenant that kept serving it, not `unavailable`."""
    agent = agent_factory("fm1").start()
    agent.wait_ready()
    assert place(broker, "fm1", [lite0("openvino", "CPU")], 1)[0]
    applied, status = place(broker, "fm1", [lite0("edgetpu", "usb")], 2)
    assert applied, status
    states = {(t["backend"], t["state"]) for t in status["placement"]["tenants"]}
    assert states == {("openvino", "ready"), ("edgetpu", "failed")}, states
    saved = json.loads((agent.state_dir / "placement.json").read_text())
    assert saved["generation"] == 2 and saved["tenants"][0]["backend"] == "openvino"
    agent.stop()
    agent.start()
    c = collector(["edge/fm1/result", "edge/fm1/status"])

    def openvino_serves(statuses: list[dict]) -> bool:
        tenants = statuses[-1]["placement"]["tenants"] if statuses and statuses[-1].get("online") else []
        return ("openvino", "ready") in {(t["backend"], t["state"]) for t in tenants}

    c.wait_for(openvino_serves, "edge/fm1/status", timeout=60)
    c.publish("edge/fm1/infer", sample("cat.jpg"))
    result = c.wait_for(lambda r: len(r) >= 1, "edge/fm1/result", timeout=60)[0]
    assert result.get("tenant", {}).get("backend") == "openvino", result


def publish_at_once(broker, topic: str, payloads: list[str]) -> None:
    """Documents back to back on one connection, as a quick console or a replayed backlog sends them."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def test_documents_arriving_during_a_placement_collapse_to_the_newest(agent_factory, broker):
    """A console clicking quickly (or a replayed backlog) must not make the device load every
    intermediate placement: while one applies, only the newest of those that arrive is applied next."""
    agent = agent_factory("pb1").start()
    agent.wait_ready()
    docs = [(2, lite0("openvino", "CPU", 2)), (3, lite0()), (4, lite0("openvino", "CPU"))]
    publish_at_once(
        broker, "edge/pb1/placement", [json.dumps({"generation": g, "tenants": [t]}) for g, t in docs]
    )
    wait_for_log(agent, "placement generation 4 applied")
    log = agent.log()
    assert "placement generation 2 applied" in log and "placement generation 4 applied" in log, log[-2000:]
    assert "placement generation 3 applied" not in log, "the superseded document was loaded"


def test_a_bad_document_behind_a_valid_one_does_not_drop_it(agent_factory, broker):
    """While one placement applies, a valid document and then a malformed one arrive: the malformed
    one is refused (reported), and the valid one is still applied."""
    agent = agent_factory("pb2").start()
    agent.wait_ready()
    docs = [
        json.dumps({"generation": 2, "tenants": [lite0("openvino", "CPU", 2)]}),
        json.dumps({"generation": 3, "tenants": [lite0()]}),
        "{not json",
    ]
    c = Collector(broker.port, ["edge/pb2/status"])
    try:
        publish_at_once(broker, "edge/pb2/placement", docs)
        status = wait_status(
            c,
            "pb2",
            lambda s: (
                s["placement"]["applied_generation"] == 3
                and all(t["state"] == "ready" for t in s["placement"]["tenants"])
                and any("invalid JSON" in e for e in s["errors"])
            ),
            timeout=60,
        )
    finally:
        c.close()
    assert status["placement"]["applied_generation"] == 3, status["placement"]
    assert any("invalid JSON" in e for e in status["errors"]), status["errors"]

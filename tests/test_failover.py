"""Failover across candidates over MQTT with real runtimes (docs/reliability.md, "Failover").

A tenant placed on OpenVINO CPU then ONNX Runtime CPU; a hang injected into OpenVINO (the agent's
own fault injection, EDGE_AGENT_FAULTS) while frames stream at 30 fps: every frame is answered
exactly once, with a result; the tenant moves to ONNX Runtime, shown in status and announced on
edge/<id>/events, and moves back once OpenVINO passes its probes (a one-shot fault).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

from agent.devtools.local_broker import free_port
from backends import registry
from tests.conftest import CAT_CLASSES, Collector, sample
from tests.test_console_browser import browser, console, page  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

DEVICE = "fo"
CANDIDATES = [{"backend": "openvino", "device": "CPU"}, {"backend": "onnxruntime", "device": "cpu"}]


def needs_openvino() -> None:
    ok, _devices, reason = registry.capabilities_of("openvino")
    if not ok:
        pytest.skip(f"OpenVINO unavailable: {reason}")


def config(candidates: list[dict[str, str]], prometheus: str | None = None, **failover: float) -> str:
    listed = ", ".join(f'{{ backend = "{c["backend"]}", device = "{c["device"]}" }}' for c in candidates)
    return (
        "\n".join(
            [
                "[scheduler]",
                "infer_timeout_s = 1.0",
                "queue_depth = 512",
                "drain_timeout_s = 1.0",
                "[metrics]",
                "telemetry_interval_s = 1.0",
                *([f'prometheus_listen = "{prometheus}"'] if prometheus else []),
                "[failover]",
                *(f"{k} = {v}" for k, v in failover.items()),
                "[placement]",
                "generation = 1",
                "[[placement.tenants]]",
                'model = "efficientnet-lite0"',
                f"candidates = [{listed}]",
            ]
        )
        + "\n"
    )


class Stream(threading.Thread):
    """Frames at `rate` per second with unique request ids, until halted."""

    def __init__(self, c: Collector, rate: float) -> None:
        super().__init__(daemon=True)
        self.c, self.interval, self.sent, self.halt = c, 1.0 / rate, 0, threading.Event()

    def run(self) -> None:
        image = sample("cat.jpg")
        started = time.monotonic()
        while not self.halt.is_set():
            due = int((time.monotonic() - started) / self.interval) + 1
            while self.sent < due:
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [("request_id", f"f{self.sent}")]
                self.c.client.publish(f"edge/{DEVICE}/infer", image, qos=1, properties=props)
                self.sent += 1
            time.sleep(0.005)


def tenant_of(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    return statuses[-1]["placement"]["tenants"][0] if statuses and statuses[-1].get("online") else {}


def serving(statuses: list[dict[str, Any]]) -> str | None:
    t = tenant_of(statuses)
    return (t.get("serving") or {}).get("backend") if t.get("state") == "ready" else None


def run_hang_failover(agent_factory: Any, collector: Any, after: int) -> None:
    needs_openvino()
    port = free_port()
    agent = agent_factory(
        DEVICE,
        config(CANDIDATES, f"127.0.0.1:{port}", failback_after_s=1.0, probe_interval_s=0.5),
        env={"EDGE_AGENT_FAULTS": f"openvino:CPU:hang:after={after}:once"},
    ).start()
    status = agent.wait_ready(timeout=120)
    first = status["placement"]["tenants"][0]
    assert first["serving"]["backend"] == "openvino" and [c["backend"] for c in first["candidates"]] == [
        "openvino",
        "onnxruntime",
    ]
    topics = [f"edge/{DEVICE}/{t}" for t in ("result", "status", "events", "telemetry")]
    c = collector(topics)
    stream = Stream(c, rate=30.0)
    stream.start()
    try:
        events = c.wait_for(lambda e: len(e) >= 1, f"edge/{DEVICE}/events", timeout=after / 30 + 60)
        failover = events[0]
        assert (failover["type"], failover["kind"], failover["model"]) == (
            "failover",
            "failover",
            "efficientnet-lite0",
        )
        assert failover["from"] == "openvino:CPU" and failover["to"] == "onnxruntime:cpu", failover
        assert failover["reason"].startswith("stall"), failover
        statuses = c.wait_for(lambda s: serving(s) == "onnxruntime", f"edge/{DEVICE}/status", timeout=30)
        assert tenant_of(statuses)["last_failover"]["to"] == "onnxruntime:cpu"
        print(f"time to recover from the hang: {failover['recovery_s']:.2f} s")
        # The one-shot fault is spent: OpenVINO passes its probe, and the tenant moves back.
        events = c.wait_for(lambda e: len(e) >= 2, f"edge/{DEVICE}/events", timeout=60)
        assert events[1]["kind"] == "failback" and events[1]["to"] == "openvino:CPU", events[1]
        statuses = c.wait_for(lambda s: serving(s) == "openvino", f"edge/{DEVICE}/status", timeout=30)
        assert [m["kind"] for m in tenant_of(statuses)["failovers"]] == ["failover", "failback"]
        sent_back = stream.sent
        c.wait_for(
            lambda r: any(m["request_id"] == f"f{sent_back + 15}" for m in r), f"edge/{DEVICE}/result", 30
        )
    finally:
        stream.halt.set()
        stream.join()
    total = stream.sent
    results = c.wait_for(lambda r: len({m["request_id"] for m in r}) >= total, f"edge/{DEVICE}/result", 60)
    counts = Counter(m["request_id"] for m in results)
    assert set(counts) == {f"f{i}" for i in range(total)}, "every frame answered"
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    errors = [m for m in results if "error" in m]
    assert not errors, errors[:3]
    backends = Counter(m["tenant"]["backend"] for m in results)
    assert backends["onnxruntime"] > 0 and backends["openvino"] > after, backends
    assert all(m["top"][0]["index"] in CAT_CLASSES for m in results)
    telemetry = c.wait_for(
        lambda t: any(x["failovers"] >= 2 for x in t[-1]["tenants"]) if t else False,
        f"edge/{DEVICE}/telemetry",
    )
    assert telemetry[-1]["tenants"][0]["backend"] == "openvino"
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    moves = {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(scraped)
        if family.name == "edge_agent_failovers"
        for sample in family.samples
        if sample.name == "edge_agent_failovers_total"
    }
    assert moves == {"efficientnet-lite0": 2.0}, moves
    log = agent.log()
    assert "FAULT INJECTION IS ON: openvino:CPU:hang:after=" in log
    assert agent.stop() == 0


def test_a_hung_openvino_hands_over_to_onnxruntime_every_frame_once_and_back(agent_factory, collector):
    run_hang_failover(agent_factory, collector, after=60)


@pytest.mark.slow
def test_the_hang_after_200_frames_at_30_fps(agent_factory, collector):
    """The issue's figure: the hang comes after 200 frames."""
    run_hang_failover(agent_factory, collector, after=200)


def test_a_single_candidate_behaves_as_before(agent_factory, collector):
    """One candidate: a hang is answered `internal` and the tenant shows failed; nothing moves."""
    agent = agent_factory(
        DEVICE,
        config([{"backend": "onnxruntime", "device": "cpu"}]),
        env={"EDGE_AGENT_FAULTS": "onnxruntime:cpu:hang:after=2"},
    ).start()
    agent.wait_ready(timeout=120)
    c = collector([f"edge/{DEVICE}/result", f"edge/{DEVICE}/status", f"edge/{DEVICE}/events"])
    for i in range(4):
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("request_id", f"s{i}")]
        c.publish(f"edge/{DEVICE}/infer", sample("cat.jpg"), properties=props)
    results = c.wait_for(lambda r: len(r) >= 4, f"edge/{DEVICE}/result", timeout=30)
    answers = {m["request_id"]: m.get("error", {}).get("code", "ok") for m in results}
    assert answers["s0"] == answers["s1"] == "ok" and answers["s2"] == "internal", answers
    statuses = c.wait_for(lambda s: tenant_of(s).get("state") == "failed", f"edge/{DEVICE}/status")
    assert tenant_of(statuses).get("last_failover") is None
    assert not c.json(f"edge/{DEVICE}/events")
    assert agent.stop() == 0


def test_every_tenant_leaves_an_accelerator_another_tenant_found_failing(agent_factory, collector):
    """Health is per accelerator: runtime errors of lite0 on OpenVINO move lite1 (idle, same
    accelerator) to ONNX Runtime too, make-before-break."""
    needs_openvino()
    listed = ", ".join(f'{{ backend = "{c["backend"]}", device = "{c["device"]}" }}' for c in CANDIDATES)
    text = config(CANDIDATES, errors_to_fail=1, failback_after_s=3600) + (
        f'[[placement.tenants]]\nmodel = "efficientnet-lite1"\ncandidates = [{listed}]\n'
    )
    agent = agent_factory(DEVICE, text, env={"EDGE_AGENT_FAULTS": "openvino:CPU:error:after=1"}).start()
    agent.wait_ready(timeout=180)
    c = collector([f"edge/{DEVICE}/result", f"edge/{DEVICE}/status", f"edge/{DEVICE}/events"])
    for i in range(2):
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("request_id", f"a{i}")]
        c.publish(f"edge/{DEVICE}/infer/efficientnet-lite0", sample("cat.jpg"), properties=props)
    events = c.wait_for(lambda e: len(e) >= 2, f"edge/{DEVICE}/events", timeout=60)
    moved = {e["model"]: e for e in events}
    assert moved["efficientnet-lite0"]["reason"].startswith("error: 1 runtime errors in a row"), events
    assert moved["efficientnet-lite1"]["reason"].startswith("openvino:CPU unhealthy (error:"), events
    assert all(e["to"] == "onnxruntime:cpu" for e in events)

    def both_moved(statuses: list[dict[str, Any]]) -> bool:
        tenants = statuses[-1]["placement"]["tenants"] if statuses and statuses[-1].get("online") else []
        return len(tenants) == 2 and all(
            t["state"] == "ready" and t["serving"]["backend"] == "onnxruntime" for t in tenants
        )

    c.wait_for(both_moved, f"edge/{DEVICE}/status", timeout=30)
    results = c.wait_for(lambda r: len(r) >= 2, f"edge/{DEVICE}/result", timeout=30)
    assert [m["tenant"]["backend"] for m in results] == ["openvino", "onnxruntime"], results
    assert agent.stop() == 0


def test_the_console_shows_candidates_history_and_flags_the_tenant_off_its_preferred_one(
    agent_factory,
    collector,
    console,  # noqa: F811 (the fixture imported above)
    page,  # noqa: F811
):
    """Runtime errors (injected) move the tenant off OpenVINO; the console's fleet table flags it
    and the device page lists its candidates, the serving one and the failover."""
    from tests.test_console_browser import expect, log_in

    needs_openvino()
    agent = agent_factory(
        DEVICE,
        config(CANDIDATES, errors_to_fail=1, failback_after_s=3600),
        env={"EDGE_AGENT_FAULTS": "openvino:CPU:error:after=1"},
    ).start()
    agent.wait_ready(timeout=120)
    c = collector([f"edge/{DEVICE}/result", f"edge/{DEVICE}/status"])
    for i in range(2):
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("request_id", f"c{i}")]
        c.publish(f"edge/{DEVICE}/infer", sample("cat.jpg"), properties=props)
    results = c.wait_for(lambda r: len(r) >= 2, f"edge/{DEVICE}/result", timeout=60)
    assert [m["tenant"]["backend"] for m in results] == ["openvino", "onnxruntime"], results
    c.wait_for(lambda s: serving(s) == "onnxruntime", f"edge/{DEVICE}/status", timeout=30)

    log_in(page, console, "admin", console.admin_password)
    row = page.locator(f'#fleet-body tr[data-device="{DEVICE}"]')
    expect(row.locator(".not-preferred")).to_have_text("not on openvino:CPU")
    expect(row).to_contain_text("efficientnet-lite0 onnxruntime:cpu")
    row.locator("a").click()
    page.wait_for_url(f"**/devices/{DEVICE}")
    tenant = page.locator('#tenants-body tr[data-model="efficientnet-lite0"][data-backend="onnxruntime"]')
    expect(tenant.locator(".candidates")).to_contain_text("openvino:CPU → onnxruntime:cpu")
    expect(tenant.locator(".candidate.serving")).to_have_text("onnxruntime:cpu")
    expect(tenant.locator(".chip.not-preferred")).to_be_visible()
    tenant.locator("details.failovers summary").click()
    expect(tenant.locator("details.failovers li")).to_contain_text("failover openvino:CPU → onnxruntime:cpu")
    expect(tenant.locator("details.failovers li")).to_contain_text("1 runtime errors in a row")


def test_place_names_candidates_from_the_command_line(agent_factory):
    """`edge-agent place --candidates` publishes an ordered list; the agent serves on the first."""
    needs_openvino()
    agent = agent_factory(DEVICE).start()
    agent.wait_ready(timeout=120)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "place",
            "--broker",
            agent.broker.url,
            "--device-id",
            DEVICE,
            "--model",
            "efficientnet-lite0",
            "--candidates",
            "openvino:CPU,onnxruntime:cpu",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    status = agent.wait_ready(timeout=60)
    (tenant,) = status["placement"]["tenants"]
    assert [(c["backend"], c["device"]) for c in tenant["candidates"]] == [
        ("openvino", "CPU"),
        ("onnxruntime", "cpu"),
    ]
    assert tenant["serving"]["backend"] == "openvino"
    assert agent.stop() == 0


def wait_log(agent: Any, needle: str, timeout: float = 60.0) -> str:
    """Wait for a line of the agent's log (the event itself, not a guess at how long it takes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = agent.log()
        if needle in log:
            return log
        if agent.proc is not None and agent.proc.poll() is not None:
            raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{log[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} in the log within {timeout:g} s:\n{agent.log()[-3000:]}")


def test_stopping_the_agent_mid_failover_answers_every_frame_once_and_exits(agent_factory, collector):
    """SIGTERM while a failover is under way: OpenVINO hung (a frame caught in the call), the next
    candidate's warm-up hangs too, so the frames wait in the relay. Each is answered once,
    `shutting_down`, and the agent exits cleanly."""
    needs_openvino()
    listed = ", ".join(f'{{ backend = "{c["backend"]}", device = "{c["device"]}" }}' for c in CANDIDATES)
    text = "\n".join(
        [
            "[scheduler]",
            "infer_timeout_s = 1.0",
            "load_timeout_s = 300.0",  # the hung load is still under way when the agent stops
            "drain_timeout_s = 1.0",
            "[placement]",
            "generation = 1",
            "[[placement.tenants]]",
            'model = "efficientnet-lite0"',
            f"candidates = [{listed}]",
            # Only there to set off the ONNX Runtime fault before the failover: once fired, every
            # warm-up on onnxruntime:cpu hangs (agent/frames/faults.py), the failover's included.
            "[[placement.tenants]]",
            'model = "efficientnet-lite1"',
            'backend = "onnxruntime"',
            'device = "cpu"',
        ]
    )
    faults = "onnxruntime:cpu:hang:after=0,openvino:CPU:hang:after=2"
    agent = agent_factory(DEVICE, text + "\n", env={"EDGE_AGENT_FAULTS": faults}).start()
    agent.wait_ready(timeout=180)
    c = collector([f"edge/{DEVICE}/result"])

    def send(model: str, request_id: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("request_id", request_id)]
        c.publish(f"edge/{DEVICE}/infer/{model}", sample("cat.jpg"), properties=props)

    send("efficientnet-lite1", "b0")
    wait_log(agent, "call 1 after 1 frames on onnxruntime:cpu")
    for i in range(3):
        send("efficientnet-lite0", f"a{i}")  # a2 meets the hang on OpenVINO
    wait_log(agent, "; failing over")
    wait_log(
        agent, "FAULT INJECTED (hang): call 2 after 1 frames on onnxruntime:cpu"
    )  # the next one's warm-up
    for i in range(3, 6):
        send("efficientnet-lite0", f"a{i}")  # held in the relay
    assert agent.stop() == 0
    ids = ["b0", *(f"a{i}" for i in range(6))]
    results = c.wait_for(lambda r: {m["request_id"] for m in r} >= set(ids), f"edge/{DEVICE}/result", 30)
    counts = Counter(m["request_id"] for m in results)
    assert all(counts[i] == 1 for i in ids), counts
    codes = {m["request_id"]: m.get("error", {}).get("code", "ok") for m in results}
    assert codes == {
        "b0": "internal",
        "a0": "ok",
        "a1": "ok",
        "a2": "shutting_down",
        "a3": "shutting_down",
        "a4": "shutting_down",
        "a5": "shutting_down",
    }, codes
    log = agent.log()
    assert "the agent stopped while this frame moved to another candidate" in "".join(
        m.get("error", {}).get("message", "") for m in results
    ), log[-3000:]
    assert "failover from" not in log, "no candidate took the tenant before the stop"

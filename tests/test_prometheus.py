"""/metrics with Prometheus' own parser: names in base units, per-tenant latency histograms in seconds,
throughput without a ceiling, scrapes that leave telemetry alone, host figures."""

from __future__ import annotations

import json
import os
import re
import time
import typing
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.devtools.local_broker import LocalBroker, free_port
from agent.frames.ingest import Frame
from agent.frames.tenant import Tenant
from agent.frames.tenant_table import TenantTable
from agent.observability.prometheus import registry_for, render
from agent.observability.reporting import Reporter
from agent.observability.stats import LATENCY_BUCKETS_S, TenantStats
from agent.protocol.schemas import BatchSpec, ErrorCode, ErrorResult, InferResult, TenantSpec
from agent.protocol.topics import Topics
from agent.service.config import AgentConfig
from agent.service.model_repo import ModelRepository
from backends.fake import FakeBackend
from tests.conftest import MODELS, REPO, SAMPLES, AgentProcess, Collector, sample

BANNED_UNITS = ("_ms", "_milliseconds", "_megabytes", "_mb", "_percent", "_fps")
DASHBOARD = REPO / "deploy" / "grafana" / "edge-agent.json"
# Present only where the hardware is: an NVIDIA GPU (nvidia-ml-py), thermal zones.
OPTIONAL = {"edge_agent_gpu_", "edge_agent_temperature_celsius"}


def dashboard_metrics(prefix: str) -> set[str]:
    """Metric names the Grafana dashboard's queries read, as families (no _bucket/_sum/_count)."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    names = {n for e in exprs for n in re.findall(r"\b(" + prefix + r"[a-z0-9_]+)", e)}
    return {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in names}


def check_dashboard_reads(families: dict[str, tuple[str, list[Sample]]], prefix: str) -> None:
    exposed = {re.sub(r"_total$", "", name) for name in families}
    wanted = {n for n in dashboard_metrics(prefix) if not any(n.startswith(o) for o in OPTIONAL)}
    assert wanted, prefix
    assert wanted <= exposed, f"the dashboard reads metrics nobody exposes: {wanted - exposed}"


def parse(body: str) -> dict[str, tuple[str, list[Sample]]]:
    return {f.name: (f.type, list(f.samples)) for f in text_string_to_metric_families(body)}


def samples(families: dict[str, tuple[str, list[Sample]]], name: str, **labels: str) -> list[Sample]:
    return [
        s
        for family in families.values()
        for s in family[1]
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(families: dict[str, tuple[str, list[Sample]]], name: str, **labels: str) -> float:
    found = samples(families, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return float(found[0].value)


class Sink:
    def __init__(self) -> None:
        self.outcomes: list[InferResult | ErrorResult] = []

    def __call__(self, frame: Frame, outcome: InferResult | ErrorResult) -> None:
        self.outcomes.append(outcome)


@pytest.fixture
def reporter(tmp_path: Path) -> Iterator[tuple[Reporter, Tenant, Sink]]:
    """A real reporter over a real tenant table holding a tenant with the fake runtime."""
    config = AgentConfig(device_id="unit1", state_dir=tmp_path)
    table = TenantTable()
    sink = Sink()
    spec = TenantSpec(
        model="efficientnet-lite0", backend="fake", device="cpu", instances=2, batch=BatchSpec(max_size=64)
    )
    tenant = Tenant(
        spec,
        ModelRepository(MODELS).load("efficientnet-lite0"),
        FakeBackend(),
        sink,
        queue_depth=100_000,
        overload_policy="reject_new",
        max_pixels=40_000_000,
    )
    tenant.load()
    tenant.start()
    table.install(tenant)
    yield Reporter(config, Topics("unit1"), table, rejected=lambda: {"bad_image": 2}), tenant, sink
    tenant.drain(5.0)


def tiny_jpeg() -> bytes:
    image = cv2.resize(cv2.imread(str(SAMPLES / "cat.jpg")), (32, 32), interpolation=cv2.INTER_AREA)
    return bytes(cv2.imencode(".jpg", image)[1])


def test_fps_comes_from_counts_and_has_no_ceiling() -> None:
    """The old figure was the size of a 4096-latency window over 5 s: never above 819 fps."""
    stats = TenantStats()
    for _ in range(6000):
        stats.served(0.5)
    assert stats.frames_out == 6000
    fps = stats.snapshot(5.0).fps
    assert isinstance(fps, float) and fps >= 6000 / 5.0 > 819  # all 6000 fall inside the window


def test_histogram_buckets_are_cumulative_in_seconds() -> None:
    stats = TenantStats()
    for ms in (0.2, 3.0, 3.0, 40.0, 20_000.0):
        stats.served(ms, queue_ms=0.1, preprocess_ms=1.0, infer_ms=2.0)
    buckets, total = stats.histograms()["total"]
    counts = dict(buckets)
    assert counts["0.0005"] == 1 and counts["0.005"] == 3 and counts["0.05"] == 4 and counts["10.0"] == 4
    assert counts["+Inf"] == 5 and total == pytest.approx(20.0462)
    assert [le for le, _ in buckets[:-1]] == [repr(float(b)) for b in LATENCY_BUCKETS_S]
    assert dict(stats.histograms()["infer"][0])["0.0025"] == 5


def test_fake_backend_tenant_metrics_parse_and_count(reporter: tuple[Reporter, Tenant, Sink]) -> None:
    rep, tenant, sink = reporter
    image = tiny_jpeg()
    n = 3000
    started = time.monotonic()
    for i in range(n):
        tenant.submit(
            Frame(request_id=f"r{i}", model="efficientnet-lite0", image=image, received=time.monotonic())
        )
    deadline = time.monotonic() + 120
    while len(sink.outcomes) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    assert len(sink.outcomes) == n and all(isinstance(o, InferResult) for o in sink.outcomes)
    telemetry_fps = tenant.stats.snapshot(5.0).fps
    print(
        f"\nfake backend, 2 instances, batches up to 64: {n} frames in {elapsed:.2f} s = {n / elapsed:.0f} fps; "
        f"telemetry fps over 5 s: {telemetry_fps:.0f}"
    )
    families = parse(render(registry_for(rep)).decode())
    assert families["edge_agent_latency_seconds"][0] == "histogram"
    labels = {"device_id": "unit1", "model": "efficientnet-lite0", "backend": "fake", "device": "cpu"}
    assert value(families, "edge_agent_frames_out_total", **labels) == n
    for stage in ("queue", "preprocess", "infer", "total"):
        assert value(families, "edge_agent_latency_seconds_count", **labels, stage=stage) == n
        inf = value(families, "edge_agent_latency_seconds_bucket", **labels, stage=stage, le="+Inf")
        assert inf == n
    total_sum = value(families, "edge_agent_latency_seconds_sum", **labels, stage="total")
    assert 0 < total_sum / n < elapsed  # seconds per frame, not milliseconds
    assert value(families, "edge_agent_batch_size_count", **labels) >= 1
    assert value(families, "edge_agent_rejected_total", device_id="unit1", code="bad_image") == 2


def documented_refusal_codes() -> set[str]:
    """The codes docs/protocol.md says telemetry's `rejected` counts (its "Telemetry" section)."""
    text = (REPO / "docs" / "protocol.md").read_text()
    paragraph = text[text.index("`rejected`: frames answered") :].split("\n\n")[0]
    return set(re.findall(r"`([a-z_]+)`", paragraph)) & set(typing.get_args(ErrorCode))


def test_every_documented_refusal_code_has_a_sample_from_the_start(
    reporter: tuple[Reporter, Tenant, Sink],
) -> None:
    """A dashboard's refusals line is not empty before the first refusal: each code reads 0."""
    rep = reporter[0]
    quiet = Reporter(rep.config, rep.topics, rep.table, rejected=lambda: {})
    families = parse(render(registry_for(quiet)).decode())
    codes = documented_refusal_codes()
    assert len(codes) >= 6, codes
    assert families["edge_agent_rejected"][0] == "counter"
    for code in codes:
        assert value(families, "edge_agent_rejected_total", device_id="unit1", code=code) == 0, code
    # the device's own counters start at 0 too
    assert value(families, "edge_agent_duplicates_total", device_id="unit1") == 0
    assert value(families, "edge_agent_publishes_refused_total", device_id="unit1") == 0


def test_publishes_the_broker_refuses_are_counted(shared_dir: Path, tmp_path: Path) -> None:
    """A broker ACL that forbids the result topic: the refused publishes show in telemetry and
    /metrics (`publishes_refused`), where an operator sees a misconfigured ACL."""
    acl = shared_dir / "acl"
    acl.write_text("topic readwrite #\ntopic read $SYS/#\ntopic deny edge/deny1/result\n")
    acl.chmod(0o644)
    port = free_port()
    config = f'[metrics]\ntelemetry_interval_s = 1\nprometheus_listen = "127.0.0.1:{port}"\n'
    with LocalBroker(extra_config=f"acl_file {acl}") as broker:
        agent = AgentProcess(broker, tmp_path, "deny1", config).start()
        try:
            agent.wait_ready()
            c = Collector(broker.port, ["edge/deny1/telemetry"])
            c.publish("edge/deny1/infer", sample("cat.jpg"))
            telemetry = c.wait_for(
                lambda msgs: bool(msgs) and msgs[-1]["publishes_refused"] >= 1, "edge/deny1/telemetry"
            )[-1]
            c.close()
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        finally:
            agent.stop()
    assert telemetry["tenants"][0]["frames_out"] == 1  # served, then refused by the broker
    families = parse(body)
    assert families["edge_agent_publishes_refused"][0] == "counter"
    assert value(families, "edge_agent_publishes_refused_total", device_id="deny1") >= 1


def test_scrapes_do_not_shorten_telemetrys_cpu_window(reporter: tuple[Reporter, Tenant, Sink]) -> None:
    rep = reporter[0]
    registry = registry_for(rep)
    rep.telemetry()  # telemetry's window starts here
    c0, w0 = sum(os.times()[:2]), time.monotonic()
    until = time.monotonic() + 0.4
    while time.monotonic() < until:  # CPU work inside the window
        sum(i * i for i in range(2000))
    for _ in range(5):
        render(registry)  # the old /metrics called cpu_percent() here and reset the window
    c1, w1 = sum(os.times()[:2]), time.monotonic()
    reading = rep.telemetry().device.cpu_percent
    expected = 100.0 * (c1 - c0) / (w1 - w0)
    assert expected > 10
    assert reading == pytest.approx(expected, rel=0.25, abs=5.0)


def test_metrics_endpoint_of_a_running_agent(broker: LocalBroker, tmp_path: Path) -> None:
    port = free_port()
    agent = AgentProcess(
        broker, tmp_path, "prom2", f'[metrics]\nprometheus_listen = "127.0.0.1:{port}"\n'
    ).start()
    try:
        agent.wait_ready()
        c = Collector(broker.port, ["edge/prom2/result"])
        c.publish("edge/prom2/infer", sample("cat.jpg"))
        c.publish("edge/prom2/infer", sample("espresso.jpg"))
        c.publish("edge/prom2/infer", b"junk")  # the decoder refuses it: a tenant error
        c.publish("edge/prom2/infer", b"")  # refused at ingest
        c.wait_for(lambda r: len(r) >= 4, "edge/prom2/result")
        c.close()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        agent.stop()
    families = parse(body)
    for name, (kind, found) in families.items():
        assert not name.endswith(BANNED_UNITS), name
        if kind == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in found), name
    labels = {"device_id": "prom2", "model": "efficientnet-lite0", "backend": "onnxruntime", "device": "cpu"}
    assert value(families, "edge_agent_frames_out_total", **labels) == 2
    assert value(families, "edge_agent_errors_total", **labels) == 1
    assert value(families, "edge_agent_rejected_total", device_id="prom2", code="bad_image") == 1
    assert families["edge_agent_latency_seconds"][0] == "histogram"
    count = value(families, "edge_agent_latency_seconds_count", **labels, stage="total")
    total = value(families, "edge_agent_latency_seconds_sum", **labels, stage="total")
    infer = value(families, "edge_agent_latency_seconds_sum", **labels, stage="infer")
    assert count == 2 and 0 < infer <= total < 30  # seconds
    memory_total = value(families, "edge_agent_system_memory_total_bytes", device_id="prom2")
    memory_free = value(families, "edge_agent_system_memory_available_bytes", device_id="prom2")
    assert 0 < memory_free < memory_total
    assert value(families, "edge_agent_state_dir_free_bytes", device_id="prom2") > 0
    assert value(families, "process_cpu_seconds_total") > 0
    assert value(families, "process_resident_memory_bytes") > 10_000_000
    assert np.isfinite(value(families, "edge_agent_start_time_seconds"))
    check_dashboard_reads(families, "edge_agent_")
    check_dashboard_reads(families, "process_")


def test_console_serves_fleet_wide_metrics(broker: LocalBroker, tmp_path: Path) -> None:
    from tests.test_console import ConsoleProcess, wait_until

    agent = AgentProcess(broker, tmp_path, "fleet1", "[metrics]\ntelemetry_interval_s = 1\n").start()
    console_dir = tmp_path / "console"
    console_dir.mkdir()
    console = ConsoleProcess(broker.url, console_dir).start()
    try:
        agent.wait_ready()
        c = Collector(broker.port, ["edge/fleet1/result"])
        c.publish("edge/fleet1/infer", sample("cat.jpg"))
        c.publish("edge/fleet1/infer", sample("daisy.jpg"))
        c.wait_for(lambda r: len(r) >= 2, "edge/fleet1/result")
        c.close()
        status, _ = console.client().call("GET", "/metrics")
        assert status == 401  # the fleet's figures are not public: a session or an API token
        admin = console.client("admin")
        labels = {
            "device_id": "fleet1",
            "model": "efficientnet-lite0",
            "backend": "onnxruntime",
            "device": "cpu",
        }

        def scraped() -> dict[str, tuple[str, list[Sample]]] | None:
            status, body = admin.call("GET", "/metrics")
            assert status == 200, body
            families = parse(body)
            found = samples(families, "edge_fleet_frames_out_total", **labels)
            return families if found and found[0].value == 2 else None

        families = wait_until(scraped, "the fleet metrics to show fleet1's two results")
    finally:
        console.stop()
        agent.stop()
    for name in families:
        assert not name.endswith(BANNED_UNITS), name
    assert value(families, "edge_fleet_device_online", device_id="fleet1") == 1
    assert 0 < value(families, "edge_fleet_latency_p95_seconds", **labels) < 30
    assert value(families, "edge_fleet_process_resident_memory_bytes", device_id="fleet1") > 10_000_000
    # the device's own figures travel in telemetry (not only the agent process's)
    memory = value(families, "edge_fleet_system_memory_total_bytes", device_id="fleet1")
    assert 0 < value(families, "edge_fleet_system_memory_available_bytes", device_id="fleet1") < memory
    assert value(families, "edge_fleet_state_dir_free_bytes", device_id="fleet1") > 0
    # every telemetry counter, the tenant's and the device's, and refusals by code from 0
    assert value(families, "edge_fleet_stalls_total", **labels) == 0
    assert value(families, "edge_fleet_publishes_refused_total", device_id="fleet1") == 0
    for code in documented_refusal_codes():
        assert value(families, "edge_fleet_rejected_total", device_id="fleet1", code=code) == 0
    check_dashboard_reads(families, "edge_fleet_")

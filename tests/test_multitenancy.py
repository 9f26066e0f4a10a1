"""Several tenants at once: two real models served side by side, fairness, bounded queues, the benchmark."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from agent.frames.ingest import Frame
from agent.frames.tenant import Tenant
from agent.protocol.schemas import ErrorResult, InferResult, TenantSpec
from agent.service.model_repo import ModelRepository
from backends.fake import FakeBackend
from tests.conftest import CAT_CLASSES, ESPRESSO, MODELS, REPO, sample

TWO_MODELS = """
[placement]
generation = 1
[[placement.tenants]]
model = "efficientnet-lite0"
instances = 2
[[placement.tenants]]
model = "efficientnet-lite1"
backend = "openvino"
device = "CPU"
instances = 1
batch = { max_size = 4, max_delay_ms = 5 }
"""


@pytest.mark.timeout(180)
def test_two_real_models_served_at_once_each_answer_names_its_model(agent_factory, collector):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    agent = agent_factory("mt1", config=TWO_MODELS).start()
    status = agent.wait_ready()
    assert {t["model"] for t in status["placement"]["tenants"]} == {
        "efficientnet-lite0",
        "efficientnet-lite1",
    }
    c = collector(["edge/mt1/result"])
    sent = {}
    for i in range(20):
        model = ("efficientnet-lite0", "efficientnet-lite1")[i % 2]
        photo = ("espresso.jpg", "cat.jpg")[(i // 2) % 2]
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = f"f{i}".encode()
        c.publish(f"edge/mt1/infer/{model}", sample(photo), properties=props)
        sent[f"f{i}"] = (model, photo)
    results = c.wait_for(lambda r: len(r) >= 20, "edge/mt1/result", timeout=90)
    assert len(results) == 20
    for r in results:
        model, photo = sent[r["request_id"]]
        assert r["model"] == model
        assert r["tenant"]["backend"] == ("onnxruntime" if model.endswith("lite0") else "openvino")
        best = r["top"][0]["index"]
        assert best == ESPRESSO if photo == "espresso.jpg" else best in CAT_CLASSES


def test_tenants_are_served_fairly(tmp_path):
    """A flooded tenant does not starve a light one: each has its own queue and instances.

    The heavy tenant gets a 200-frame backlog first, then the light one 10 frames. Served side by
    side, the two progress at about the same rate (measured: ~10 heavy answers while the light
    tenant answers its 10); a light tenant queued behind the heavy backlog (one shared queue or
    worker) would finish only after all 200. So: when the light tenant's last answer came, the heavy
    tenant had answered at most a quarter of its backlog.
    """
    lite0 = ModelRepository(MODELS).load("efficientnet-lite0")
    done: dict[str, list[tuple[float, bool]]] = {"heavy": [], "light": []}
    lock = threading.Lock()

    def sink(name: str):
        def emit(frame: Frame, outcome: InferResult | ErrorResult) -> None:
            with lock:
                done[name].append((time.monotonic(), isinstance(outcome, InferResult)))

        return emit

    tenants = {}
    for name in ("heavy", "light"):
        spec = TenantSpec(model="efficientnet-lite0", backend="fake", device="cpu")
        t = Tenant(
            spec,
            lite0,
            FakeBackend(),
            sink(name),
            queue_depth=1000,
            overload_policy="reject_new",
            max_pixels=40_000_000,
            backend_options={"per_item_ms": 5.0},
        )
        t.load()
        t.start()
        tenants[name] = t
    image = sample("cat.jpg")
    for i in range(200):
        tenants["heavy"].submit(Frame(f"h{i}", "efficientnet-lite0", image, time.monotonic()))
    for i in range(10):
        tenants["light"].submit(Frame(f"l{i}", "efficientnet-lite0", image, time.monotonic()))
    deadline = time.monotonic() + 30
    while (len(done["heavy"]) < 200 or len(done["light"]) < 10) and time.monotonic() < deadline:
        time.sleep(0.01)  # polls for the answers (an event), bounded by the deadline
    for t in tenants.values():
        t.drain(5.0)
    assert len(done["light"]) == 10 and len(done["heavy"]) == 200
    assert all(ok for name in done for _, ok in done[name]), "every frame served, none refused"
    light_finished = max(at for at, _ in done["light"])
    heavy_by_then = sum(at <= light_finished for at, _ in done["heavy"])
    assert heavy_by_then <= 50, (
        f"the light tenant finished only after {heavy_by_then} of the heavy tenant's 200 frames"
    )


@pytest.mark.timeout(180)
def test_burst_far_over_capacity_every_frame_answered(agent_factory, collector):
    agent = agent_factory("burst", config="[scheduler]\nqueue_depth = 4\n").start()
    agent.wait_ready()
    c = collector(["edge/burst/result"])
    image = sample("cat.jpg")
    for _ in range(150):
        c.client.publish("edge/burst/infer", image, qos=0)
    results = c.wait_for(lambda r: len(r) >= 150, "edge/burst/result", timeout=120)
    assert len(results) == 150
    codes = {r["error"]["code"] for r in results if "error" in r}
    assert codes == {"overloaded"}
    assert sum("top" in r for r in results) >= 4
    assert len({r["request_id"] for r in results}) == 150


@pytest.mark.slow  # the benchmark's counting is in the default set (test_bench.py); this is its CSV
@pytest.mark.timeout(300)
def test_bench_command_runs_and_writes_csv(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "bench",
            "--backends",
            "onnxruntime",
            "--instances",
            "1",
            "--batch",
            "1",
            "--seconds",
            "0.5",
            "--out",
            str(tmp_path),
            "--no-plot",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = list(csv.DictReader((tmp_path / "concurrency.csv").open()))
    modes = {r["mode"] for r in rows}
    assert {"raw", "pipeline", "e2e", "naive", "unloaded", "load70"} <= modes
    assert all(float(r["fps"]) > 0 for r in rows if r["mode"] in ("raw", "pipeline", "e2e", "naive"))
    assert "vs raw" in done.stdout


@pytest.mark.slow  # run before a GPU session (make test-all), not on every change
@pytest.mark.timeout(200)
def test_gpu_pipeline_script_smoke_runs_on_cpu(tmp_path):
    """bench/gpu.sh's benchmark has 15 minutes of GPU per session: it must not fail on a typo there."""
    pytest.importorskip("torch")
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [
            sys.executable,
            "bench/gpu_pipeline.py",
            "--device",
            "cpu",
            "--quick",
            "--seconds",
            "0.5",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())
    assert {r["mode"] for r in rows} == {"raw", "pipeline"}
    assert all(r["fps"] > 0 for r in rows)

"""`edge-agent bench --placement`: the paper's second technique, measured here.

Two models served at once (EfficientNet-Lite0 and Lite1) by one real agent behind a real Mosquitto;
aggregate end-to-end throughput when both sit on one backend, when they are spread over two
backends/accelerators, and when the agent places them itself (`backend: "auto"`). Each layout's
run is checked against the agent's telemetry (bench/agent_counters.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from agent.devtools.demo import start_agent, wait_ready
from agent.devtools.local_broker import LocalBroker
from agent.protocol.schemas import TenantSpec
from agent.service.model_repo import ModelRepository
from backends import registry
from bench.agent_counters import AgentCounters, check
from bench.concurrency import BENCH_AGENT_CONFIG, DEVICE, apply_placement, generator, jpeg_frames

MODELS = ("efficientnet-lite0", "efficientnet-lite1")
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def layouts() -> dict[str, list[TenantSpec]]:
    caps = registry.capabilities()
    have = {name for name, (ok, _d, _r) in caps.items() if ok}
    out: dict[str, list[TenantSpec]] = {
        "both on onnxruntime": [TenantSpec(model=m, backend="onnxruntime", device="cpu") for m in MODELS],
    }
    if "openvino" in have:
        out["both on openvino"] = [TenantSpec(model=m, backend="openvino", device="CPU") for m in MODELS]
        out["spread: lite0 onnxruntime, lite1 openvino"] = [
            TenantSpec(model=MODELS[0], backend="onnxruntime", device="cpu"),
            TenantSpec(model=MODELS[1], backend="openvino", device="CPU"),
        ]
        out["spread: lite0 openvino, lite1 onnxruntime"] = [
            TenantSpec(model=MODELS[0], backend="openvino", device="CPU"),
            TenantSpec(model=MODELS[1], backend="onnxruntime", device="cpu"),
        ]
    # The GPU path: onnxruntime-gpu where installed, else torch on CUDA (fp16, CUDA graphs).
    gpu = next(
        (
            (backend, device)
            for backend in ("onnxruntime", "torch")
            for device in caps.get(backend, (False, [], ""))[1]
            if device.startswith("cuda")
        ),
        None,
    )
    if gpu is not None:
        backend, device = gpu
        precision: Literal["fp16"] | None = "fp16" if backend == "torch" else None
        formats = registry.get(backend).formats
        repo = ModelRepository(MODELS_DIR)
        if all(any(f in repo.manifest(m)[1].artifacts for f in formats) for m in MODELS):
            out["GPU only"] = [
                TenantSpec(model=m, backend=backend, device=device, precision=precision) for m in MODELS
            ]
        out["GPU + CPU"] = [
            TenantSpec(model=MODELS[0], backend=backend, device=device, precision=precision),
            TenantSpec(model=MODELS[1], backend="onnxruntime", device="cpu"),
        ]
    out["auto"] = [TenantSpec(model=m, backend="auto", device="auto") for m in MODELS]
    return out


def measure(url: str, seconds: float) -> tuple[dict[str, float], dict[str, int]]:
    """Both models loaded at once, each fed by its own camera connection: per model img/s, and
    every result received (warm-up included)."""
    frames = {m: jpeg_frames(224 if m.endswith("lite0") else 240) for m in MODELS}
    rates: dict[str, float] = {}
    results: dict[str, int] = {}

    def feed(model: str) -> None:
        gen = generator(url, DEVICE, model, f"camera-{model}")
        try:
            rates[model], tally = gen.closed_loop(frames[model], 6, seconds, 1.0)
            results[model] = tally.results
        finally:
            gen.close()

    threads = [threading.Thread(target=feed, args=(m,)) for m in MODELS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {m: rates[m] for m in MODELS}, results


def run(args: argparse.Namespace) -> int:
    plans = layouts()
    rows: list[dict[str, Any]] = []
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edge-place-bench-") as tmp:
        agent = start_agent(broker.url, Path(tmp), DEVICE, BENCH_AGENT_CONFIG)
        counters: AgentCounters | None = None
        try:
            asyncio.run(wait_ready(broker.url, DEVICE))
            counters = AgentCounters(broker.url, DEVICE)
            generation = int(time.time())
            for i, (name, tenants) in enumerate(plans.items(), start=1):
                generation += 1
                sys.stderr.write(f"\r[{i}/{len(plans)}] {name:45s}")
                sys.stderr.flush()
                asyncio.run(apply_placement(broker.url, generation, tenants))
                placed = _placed(broker.url)
                before = counters.read()
                fps, results = measure(broker.url, args.seconds)
                check(before, counters.read(), results, f"layout {name!r}")
                rows.append({"layout": name, "placed": placed, **fps, "total": sum(fps.values())})
            sys.stderr.write("\n")
        finally:
            if counters is not None:
                counters.close()
            agent.terminate()
            agent.wait(30)
    base = rows[0]["total"]
    print(f"\n{'layout':45s} {'placed as':52s} {'lite0':>7s} {'lite1':>7s} {'total':>7s} {'ratio':>6s}")
    print("-" * 130)
    for r in rows:
        r["ratio"] = r["total"] / base
        print(
            f"{r['layout']:45s} {r['placed']:52s} {r[MODELS[0]]:7.1f} {r[MODELS[1]]:7.1f} {r['total']:7.1f} "
            f"{r['ratio']:5.2f}x"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "placement.json").write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out / 'placement.json'}")
    return 0


def _placed(url: str) -> str:
    from agent.commands.client import read_retained
    from agent.protocol.topics import Topics

    status = asyncio.run(read_retained(url, Topics(DEVICE).status, 2.0)) or {}
    tenants = (status.get("placement") or {}).get("tenants", [])
    return ", ".join(
        f"{t['model'][-5:]}@{t['backend']}:{t['device']}" for t in tenants if t["state"] == "ready"
    )

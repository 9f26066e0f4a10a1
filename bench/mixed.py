"""`edge-agent bench --mixed`: a detector and a classifier sharing one device, against each alone.

Per backend (ONNX Runtime, OpenVINO), the COCO detector (mb3-centernet) and a classifier
(efficientnet-lite0, or --model), one instance each, measured three ways: each model alone, then
both at once, in the columns of the concurrency benchmark:
  raw       the runtime in-process on a pre-made input tensor (the limit),
  pipeline  the agent's tenants in-process (JPEG decode, preprocess, infer, decode boxes or top-k),
  e2e       the real agent process behind a real Mosquitto, JPEG frames over MQTT 5, one camera
            connection per model,
and naive: one naive subscriber script per model (bench/naive_subscriber.py), over the same broker.

The multi-tenant gain is the sum of each model's share of its alone rate when both run together:
1.0 is what taking turns on the device gives (half the time each: half of each rate); above 1 the
two tenants fill what the other leaves idle (cores, memory stalls, Python between runtime calls).
Each end-to-end run is checked against the agent's telemetry (bench/agent_counters.py).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agent.devtools.demo import start_agent, wait_ready
from agent.devtools.local_broker import LocalBroker
from agent.frames.ingest import Frame
from agent.frames.preprocess import Preprocessor
from agent.frames.tenant import Tenant
from agent.protocol.schemas import TenantSpec
from agent.service.model_repo import Model, ModelRepository
from backends import registry
from bench.agent_counters import AgentCounters, check
from bench.concurrency import (
    BENCH_AGENT_CONFIG,
    DEFAULT_DEVICE,
    DEVICE,
    MODELS,
    SAMPLES,
    apply_placement,
    generator,
    jpeg_frames,
)
from bench.naive_subscriber import spawn

DETECTOR = "mb3-centernet"
MODES = ("raw", "pipeline", "e2e", "naive")


def camera_frames() -> list[bytes]:
    """640x480 JPEGs of the detection photos, as a camera sends them (the detector sees the whole
    frame; the classifier its centre crop)."""
    frames = []
    for path in sorted((SAMPLES / "detection").glob("*.jpg")):
        buf = io.BytesIO()
        Image.open(path).convert("RGB").resize((640, 480)).save(buf, "JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames


def run_lanes(lanes: Mapping[str, Callable[[], int]], seconds: float, warmup: float) -> dict[str, float]:
    """Each lane (a model) loops in its own thread: items per second over the measured window."""
    counts = dict.fromkeys(lanes, 0)
    measuring = threading.Event()
    stop = threading.Event()

    def loop(name: str, step: Callable[[], int]) -> None:
        while not stop.is_set():
            done = step()
            if measuring.is_set():
                counts[name] += done

    threads = [threading.Thread(target=loop, args=item, daemon=True) for item in lanes.items()]
    for t in threads:
        t.start()
    time.sleep(warmup)  # pacing: the warm-up window before counting
    measuring.set()
    started = time.monotonic()
    time.sleep(seconds)  # pacing: the measured window
    measuring.clear()
    elapsed = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(30)
    return {name: n / elapsed for name, n in counts.items()}


def measure_raw(
    backend: str, device: str, models: list[Model], frames: list[bytes], seconds: float
) -> dict[str, float]:
    sessions = {m.name: registry.get(backend).load(m.artifacts, device, {"instances": 1}) for m in models}
    inputs = {m.name: Preprocessor(m.input, 40_000_000)(frames[0])[None] for m in models}
    try:
        lanes = {name: partial(_infer_once, session, inputs[name]) for name, session in sessions.items()}
        return run_lanes(lanes, seconds, 1.0)
    finally:
        for session in sessions.values():
            session.close()


def _infer_once(session: Any, x: np.ndarray) -> int:
    session.infer(x)
    return 1


def measure_pipeline(
    backend: str, device: str, models: list[Model], frames: dict[str, list[bytes]], seconds: float
) -> dict[str, float]:
    """Each model's tenant in-process, fed through a window of 4 frames by its own thread."""
    tenants: dict[str, Tenant] = {}
    slots = {m.name: threading.Semaphore(4) for m in models}
    for m in models:
        tenants[m.name] = Tenant(
            TenantSpec(model=m.name, backend=backend, device=device),
            m,
            registry.get(backend),
            lambda frame, _outcome: slots[frame.model].release(),
            queue_depth=16,
            overload_policy="reject_new",
            max_pixels=40_000_000,
        )
        tenants[m.name].load()
        tenants[m.name].start()
    sent = dict.fromkeys(tenants, 0)

    def step(name: str) -> int:
        slots[name].acquire()
        sent[name] += 1
        images = frames[name]
        tenants[name].submit(
            Frame(
                request_id=str(sent[name]),
                model=name,
                image=images[sent[name] % len(images)],
                received=time.monotonic(),
            )
        )
        return 1

    try:
        return run_lanes({name: partial(step, name) for name in tenants}, seconds, 1.0)
    finally:
        for tenant in tenants.values():
            tenant.drain(10.0)


def measure_e2e(
    url: str, targets: dict[str, str], frames: dict[str, list[bytes]], seconds: float, routed: bool = True
) -> tuple[dict[str, float], dict[str, int]]:
    """One camera connection per model (model -> device id), closed loop, answers read from the
    result topic; `routed`: frames name their model in the topic (the naive scripts serve one each
    on the plain infer topic). Per model: img/s, and every result received (warm-up included)."""
    rates: dict[str, float] = {}
    results: dict[str, int] = {}

    def feed(model: str, device_id: str) -> None:
        gen = generator(url, device_id, model if routed else None, f"camera-{device_id}-{model}")
        try:
            rates[model], tally = gen.closed_loop(frames[model], 4, seconds, 1.0)
            results[model] = tally.results
        finally:
            gen.close()

    threads = [threading.Thread(target=feed, args=item) for item in targets.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rates, results


def run(args: argparse.Namespace) -> int:
    repo = ModelRepository(MODELS)
    names = [DETECTOR, args.model]
    models = [repo.load(name) for name in names]
    cam = camera_frames()
    frames = {DETECTOR: cam, args.model: jpeg_frames(models[1].input.size[0])}
    caps = registry.capabilities()
    backends = [b for b in args.backends if caps.get(b, (False,))[0]]
    rows: list[dict[str, Any]] = []
    workloads = {f"{DETECTOR} alone": [DETECTOR], f"{args.model} alone": [args.model], "together": names}
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edge-mixed-") as tmp:
        agent = start_agent(broker.url, Path(tmp), DEVICE, BENCH_AGENT_CONFIG)
        log = (Path(tmp) / "naive.log").open("ab")
        naive = [spawn(broker.port, f"naive-{name}", name, log) for name in names]
        counters: AgentCounters | None = None
        try:
            asyncio.run(wait_ready(broker.url, DEVICE))
            counters = AgentCounters(broker.url, DEVICE)
            generation = int(time.time())
            for backend in backends:
                device = args.device or DEFAULT_DEVICE.get(backend, "cpu")
                for workload, chosen in workloads.items():
                    sys.stderr.write(f"\r{backend:12s} {workload:30s}")
                    sys.stderr.flush()
                    subset = [m for m in models if m.name in chosen]
                    generation += 1
                    specs = [TenantSpec(model=m, backend=backend, device=device) for m in chosen]
                    measured = {
                        "raw": measure_raw(backend, device, subset, cam, args.seconds),
                        "pipeline": measure_pipeline(backend, device, subset, frames, args.seconds),
                    }
                    asyncio.run(apply_placement(broker.url, generation, specs))
                    before = counters.read()
                    measured["e2e"], results = measure_e2e(
                        broker.url, dict.fromkeys(chosen, DEVICE), frames, args.seconds
                    )
                    check(before, counters.read(), results, f"e2e {backend} {workload}")
                    for mode, fps in measured.items():
                        rows += [
                            {"backend": backend, "workload": workload, "mode": mode, "model": m, "fps": v}
                            for m, v in fps.items()
                        ]
            for workload, chosen in workloads.items():  # naive: onnxruntime in the user's own script
                fps, _ = measure_e2e(  # the naive scripts remember nothing: no counters to check
                    broker.url, {m: f"naive-{m}" for m in chosen}, frames, args.seconds, routed=False
                )
                rows += [
                    {"backend": "naive", "workload": workload, "mode": "naive", "model": m, "fps": v}
                    for m, v in fps.items()
                ]
            sys.stderr.write("\n")
        finally:
            if counters is not None:
                counters.close()
            for proc in (agent, *naive):
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    summary = _print(rows, names, [*backends, "naive"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed.json").write_text(json.dumps({"rows": rows, "gain": summary}, indent=2))
    print(f"\nwrote {out / 'mixed.json'}")
    return 0


def _print(rows: list[dict[str, Any]], names: list[str], backends: list[str]) -> dict[str, dict[str, float]]:
    """The table (img/s per model and workload, per mode) and the multi-tenant gain per backend and mode."""
    fps = {(r["backend"], r["workload"], r["mode"], r["model"]): r["fps"] for r in rows}
    gains: dict[str, dict[str, float]] = {}
    print(f"\n{'backend':12s} {'workload':30s} {'model':20s} " + " ".join(f"{m:>9s}" for m in MODES))
    print("-" * 106)
    for backend in backends:
        for workload in (f"{names[0]} alone", f"{names[1]} alone", "together"):
            for model in names:
                cells = [fps.get((backend, workload, mode, model)) for mode in MODES]
                if all(c is None for c in cells):
                    continue
                print(
                    f"{backend:12s} {workload:30s} {model:20s} "
                    + " ".join(f"{c:9.1f}" if c is not None else f"{'':>9s}" for c in cells)
                )
        gains[backend] = {}
        for mode in MODES:
            alone = [fps.get((backend, f"{m} alone", mode, m)) for m in names]
            together = [fps.get((backend, "together", mode, m)) for m in names]
            if all(a for a in alone) and all(t is not None for t in together):
                gains[backend][mode] = round(sum(t / a for t, a in zip(together, alone, strict=True)), 3)  # type: ignore[operator]
        shown = ", ".join(f"{mode} {g:.2f}" for mode, g in gains[backend].items())
        print(f"{backend:12s} multi-tenant gain (sum of shares of the alone rates; 1.00 = turns): {shown}")
    return gains

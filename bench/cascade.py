"""`edge-agent bench --cascade`: a classifier on a detector's boxes, against the detector alone.

The real agent process behind a real Mosquitto, frames over MQTT 5 in a closed loop (`--inflight`
frames outstanding), measured side by side in one run:
  detector      the COCO detector (mb3-centernet) alone,
  cascade N     the detector followed by the classifier (efficientnet-lite0, or --model) on N crops
                per frame (N = 1, 5, 10: the cascade's `max_crops` on one frame with 10 boxes),
                crops batched into the classifier (batch.max_size 16, what is queued),
  per-crop      10 crops, the classifier at batch.max_size 1: one runtime call per crop.
The frame is a 1280x848 mosaic of the detection photos, on which the detector finds 10 boxes (people,
dogs, horses, a car). Each row: frames/s, crops/s, p50/p99 of the answer's round trip; the cascade's
added p99 against the detector alone, and batched crops/s against one call per crop. The
configurations run in alternating rounds (`--rounds`), so that a machine busy with something else
for a while weighs on all of them. Then the classifier tenant alone, in-process, fed the 10 crops of
a frame at a time: batched against one call per crop, per backend, again in alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agent.commands.client import InferClient
from agent.devtools.demo import start_agent, stop_process
from agent.devtools.local_broker import LocalBroker
from agent.frames.cascade import chosen_boxes, crop
from agent.frames.detection import options_for
from agent.frames.ingest import Frame
from agent.frames.postprocess import detections
from agent.frames.preprocess import Preprocessor
from agent.frames.tenant import Tenant
from agent.protocol.schemas import BatchSpec, CascadeSpec, TenantSpec
from agent.service.model_repo import ModelRepository
from backends import registry
from bench.concurrency import BENCH_AGENT_CONFIG, DEFAULT_DEVICE, DEVICE, MODELS, SAMPLES, apply_placement

DETECTOR = "mb3-centernet"
TILES = ("person.jpg", "dog.jpg", "horses.jpg", "person.jpg")


def mosaic() -> bytes:
    """Four photos in a 2x2 1280x848 JPEG: 10 boxes at the detector's default threshold."""
    frame = Image.new("RGB", (1280, 848))
    for i, name in enumerate(TILES):
        tile = Image.open(SAMPLES / "detection" / name).convert("RGB").resize((640, 424))
        frame.paste(tile, ((i % 2) * 640, (i // 2) * 424))
    out = io.BytesIO()
    frame.save(out, "JPEG", quality=90)
    return out.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(broker_url: str, frame: bytes, seconds: float, inflight: int) -> dict[str, Any]:
    """`inflight` senders, each sending its next frame when its last is answered."""
    latencies: list[float] = []
    crops: list[int] = []
    errors = 0
    async with InferClient(broker_url, DEVICE) as client:
        for _ in range(5):  # warm-up: first frames pay for lazy allocations
            await asyncio.wait_for(await client.send(frame, DETECTOR), 60)
        measuring_until = time.perf_counter() + seconds

        async def sender() -> None:
            nonlocal errors
            while time.perf_counter() < measuring_until:
                reply = await asyncio.wait_for(await client.send(frame, DETECTOR), 60)
                if not reply.ok:
                    errors += 1
                    continue
                latencies.append(reply.latency_ms)
                cascade = reply.payload.get("cascade") or {}
                crops.append(int(cascade.get("classified", 0)))

        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(inflight)))
        elapsed = time.perf_counter() - started
    return {
        "frames_per_s": round(len(latencies) / elapsed, 2),
        "crops_per_s": round(sum(crops) / elapsed, 1),
        "crops_per_frame": round(statistics.mean(crops), 2) if crops else 0.0,
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "frames": len(latencies),
        "errors": errors,
        "latencies": latencies,
    }


def mosaic_crops(frame: bytes) -> list[np.ndarray]:
    """The detector's 10 boxes on the mosaic, cut from the full-resolution frame as a cascade does."""
    detector = ModelRepository(MODELS).load(DETECTOR)
    pre = Preprocessor(detector.input, 40_000_000)
    pixels = pre.decode(frame, full=True)
    x = np.empty((1, *pre.spec.size, 3), np.float32)
    size = pre.prepare_pixels(pixels, x[0])
    session = registry.get("onnxruntime").load(detector.artifacts, "cpu", {"instances": 1})
    try:
        row = np.asarray(session.infer(x)).reshape(1, -1)[0]
    finally:
        session.close()
    if detector.manifest.detection is None:
        raise ValueError(f"{DETECTOR} is not a detection model")
    found = detections(detector, row, size, options_for(detector.manifest.detection, detector.labels))
    spec = CascadeSpec(after=DETECTOR)
    return [crop(pixels, found[i].box, spec.margin) for i in chosen_boxes(found, spec, *size)]


def crop_throughput(
    classifier: str, crops: list[np.ndarray], rounds: int, seconds: float, backend: str = "onnxruntime"
) -> dict[str, float]:
    """The classifier tenant in-process (on `backend`'s CPU) given a frame's crops together as a cascade
    gives them (`submit_many`), two frames outstanding: batch.max_size 16 against 1 (one runtime
    call per crop), in alternating rounds so that both see the same machine; crops/s of each."""
    model = ModelRepository(MODELS).load(classifier)
    tenants: dict[str, Tenant] = {}
    for name, size in (("batched", 16), ("per-crop", 1)):
        tenants[name] = Tenant(
            TenantSpec(
                model=classifier,
                backend=backend,
                device=DEFAULT_DEVICE.get(backend, "cpu"),
                batch=BatchSpec(max_size=size),
            ),
            model,
            registry.get(backend),
            lambda frame, outcome: frame.on_answer(outcome) if frame.on_answer else None,
            queue_depth=1024,
            overload_policy="reject_new",
            max_pixels=40_000_000,
        )
        tenants[name].load()
        tenants[name].start()
    totals = dict.fromkeys(tenants, 0.0)
    elapsed = dict.fromkeys(tenants, 0.0)
    try:
        for _ in range(rounds):
            for name, tenant in tenants.items():
                done, took = _feed(tenant, classifier, crops, seconds)
                totals[name] += done
                elapsed[name] += took
    finally:
        for tenant in tenants.values():
            tenant.drain(10.0)
    return {name: round(totals[name] / elapsed[name], 1) for name in tenants}


def _feed(tenant: Tenant, classifier: str, crops: list[np.ndarray], seconds: float) -> tuple[int, float]:
    """Frames of crops, two outstanding, for `seconds`: crops answered and the time taken."""
    slots = threading.Semaphore(2)
    lock = threading.Lock()
    left: dict[int, int] = {}
    answered = [0]

    def answer(frame_no: int, _outcome: Any) -> None:
        with lock:
            answered[0] += 1
            left[frame_no] -= 1
            if left[frame_no] == 0:
                slots.release()

    started = time.monotonic()
    frame_no = 0
    while time.monotonic() - started < seconds:
        slots.acquire()
        frame_no += 1
        with lock:
            left[frame_no] = len(crops)
        now = time.monotonic()
        tenant.submit_many(
            [
                Frame(
                    f"{frame_no}#{i}",
                    classifier,
                    b"",
                    now,
                    pixels=c,
                    on_answer=partial(answer, frame_no),
                )
                for i, c in enumerate(crops)
            ]
        )
    for _ in range(2):
        slots.acquire()  # the last frames' crops
    return answered[0], time.monotonic() - started


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's rounds together: rates averaged over the rounds, percentiles of the
    pooled latencies."""
    latencies = [ms for got in runs for ms in got.pop("latencies")]
    return {
        "frames_per_s": round(statistics.mean(got["frames_per_s"] for got in runs), 2),
        "crops_per_s": round(statistics.mean(got["crops_per_s"] for got in runs), 1),
        "crops_per_frame": runs[0]["crops_per_frame"],
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "frames": len(latencies),
        "errors": sum(got["errors"] for got in runs),
    }


def configurations(classifier: str) -> list[tuple[str, list[TenantSpec]]]:
    detector = TenantSpec(model=DETECTOR)

    def cascade(crops: int, batch: int) -> TenantSpec:
        return TenantSpec.model_validate(
            {
                "model": classifier,
                "batch": {"max_size": batch},
                "cascade": CascadeSpec(after=DETECTOR, max_crops=crops, timeout_ms=10_000).model_dump(),
            }
        )

    return [
        ("detector", [detector]),
        ("cascade 1", [detector, cascade(1, 16)]),
        ("cascade 5", [detector, cascade(5, 16)]),
        ("cascade 10", [detector, cascade(10, 16)]),
        ("per-crop 10", [detector, cascade(10, 1)]),
    ]


def run(args: argparse.Namespace) -> int:
    frame = mosaic()
    runs: dict[str, list[dict[str, Any]]] = {}
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-cascade-") as tmp:
        agent = start_agent(broker.url, Path(tmp), DEVICE, BENCH_AGENT_CONFIG)
        try:
            generation = 0
            for round_no in range(
                args.rounds
            ):  # alternating rounds: each configuration sees the same machine
                for name, tenants in configurations(args.model):
                    generation += 1
                    asyncio.run(apply_placement(broker.url, generation, tenants))
                    got = asyncio.run(closed_loop(broker.url, frame, args.seconds, args.inflight))
                    shown = {k: v for k, v in got.items() if k != "latencies"}
                    print(f"round {round_no + 1} {name:12s} {json.dumps(shown)}", flush=True)
                    runs.setdefault(name, []).append(got)
        finally:
            stop_process(agent)
    rows = {name: merge(got) for name, got in runs.items()}
    crops = mosaic_crops(frame)
    caps = registry.capabilities()
    by_backend = {
        backend: crop_throughput(args.model, crops, args.rounds * 2, args.seconds / 2, backend)
        for backend in args.backends
        if caps.get(backend, (False,))[0]
    }
    for backend, got in by_backend.items():
        print(
            f"classifier tenant in-process on {backend}, {len(crops)} crops per frame: "
            f"{json.dumps(got)} crops/s"
        )
    in_process = by_backend["onnxruntime"]
    base = rows["detector"]["p99_ms"]
    summary = {
        "frame": "1280x848 mosaic, 10 boxes",
        "inflight": args.inflight,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "rows": rows,
        "classifier_in_process_crops_per_s": by_backend,
        "added_p99_5_crops": round(rows["cascade 5"]["p99_ms"] / base - 1.0, 3),
        "batched_vs_per_crop_e2e": round(
            rows["cascade 10"]["crops_per_s"] / max(rows["per-crop 10"]["crops_per_s"], 1e-9), 2
        ),
        "batched_vs_per_crop_in_process": round(in_process["batched"] / max(in_process["per-crop"], 1e-9), 2),
    }
    print(
        f"\n5 crops add {summary['added_p99_5_crops']:.0%} to p99 (target <= 25%); batched crops: "
        f"{summary['batched_vs_per_crop_e2e']:.2f}x the crops/s of one call per crop end to end, "
        f"{summary['batched_vs_per_crop_in_process']:.2f}x in the classifier tenant (target >= 2x)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written: {out / 'cascade.json'}")
    return 0

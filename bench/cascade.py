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
added p99 against the detector alone, and batched crops/s against one call per crop.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from agent.commands.client import InferClient
from agent.devtools.demo import start_agent, stop_process
from agent.devtools.local_broker import LocalBroker
from agent.protocol.schemas import CascadeSpec, TenantSpec
from bench.concurrency import BENCH_AGENT_CONFIG, DEVICE, SAMPLES, apply_placement

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
    rows: dict[str, dict[str, Any]] = {}
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-cascade-") as tmp:
        agent = start_agent(broker.url, Path(tmp), DEVICE, BENCH_AGENT_CONFIG)
        try:
            for generation, (name, tenants) in enumerate(configurations(args.model), start=1):
                asyncio.run(apply_placement(broker.url, generation, tenants))
                rows[name] = asyncio.run(closed_loop(broker.url, frame, args.seconds, args.inflight))
                print(f"{name:12s} {json.dumps(rows[name])}", flush=True)
        finally:
            stop_process(agent)
    base = rows["detector"]["p99_ms"]
    summary = {
        "frame": "1280x848 mosaic, 10 boxes",
        "inflight": args.inflight,
        "seconds": args.seconds,
        "rows": rows,
        "added_p99_5_crops": round(rows["cascade 5"]["p99_ms"] / base - 1.0, 3),
        "batched_vs_per_crop_crops_per_s": round(
            rows["cascade 10"]["crops_per_s"] / max(rows["per-crop 10"]["crops_per_s"], 1e-9), 2
        ),
    }
    print(
        f"\n5 crops add {summary['added_p99_5_crops']:.0%} to p99 (target <= 25%); batched crops: "
        f"{summary['batched_vs_per_crop_crops_per_s']:.2f}x the crops/s of one call per crop (target >= 2x)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written: {out / 'cascade.json'}")
    return 0

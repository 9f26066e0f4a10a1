"""GPU throughput through the agent's pipeline (run by bench/gpu.sh on a CUDA machine).

In-process, like `edge-agent bench`'s pipeline mode: 224-px JPEG frames decoded and preprocessed on
the host's cores by the tenant's instance threads, dynamic batching, the torch backend in fp16 with a
CUDA graph per batch-size bucket. Prints img/s and p50/p99 per (instances, batch) and the raw
torch limit (pre-made tensors on the GPU) beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.service.model_repo import ModelRepository
from backends import registry
from bench.concurrency import jpeg_frames, measure_pipeline, percentiles

MODELS = Path(__file__).resolve().parent.parent / "models"


def raw_limit(model: Any, device: str, batch: int, seconds: float) -> tuple[float, float, float]:
    backend = registry.get("torch")
    session = backend.load(model.artifacts, device, {"precision": "fp16", "max_batch": batch})
    x = np.random.default_rng(0).standard_normal((batch, 3, *model.input.size)).astype(np.float32)
    for _ in range(5):
        session.infer(x)
    lat, n, stop = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        session.infer(x)
        lat.append((time.perf_counter() - t0) * 1000)
        n += batch
    p50, p99 = percentiles(lat)
    return n / seconds, p50, p99


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", default="gpu-results.json")
    parser.add_argument("--device", default="cuda:0", help="cpu: a smoke run of this script, anywhere")
    parser.add_argument("--quick", action="store_true", help="two small configurations only (smoke run)")
    args = parser.parse_args()
    batches = (1, 8) if args.quick else (1, 8, 32, 128)
    configs = (
        ((1, 1), (2, 8)) if args.quick else ((1, 1), (8, 1), (4, 32), (8, 32), (8, 64), (12, 64), (16, 128))
    )
    model = ModelRepository(MODELS).load("efficientnet-lite0")
    frames = jpeg_frames(224)
    rows = []
    for batch in batches:
        fps, p50, p99 = raw_limit(model, args.device, batch, args.seconds)
        rows.append({"mode": "raw", "instances": 1, "batch": batch, "fps": fps, "p50_ms": p50, "p99_ms": p99})
        print(f"raw      batch {batch:4d}: {fps:9.0f} img/s p50 {p50:6.2f} ms", flush=True)
    for instances, batch in configs:
        row = measure_pipeline("torch", args.device, model, instances, batch, args.seconds, frames, "fp16")
        rows.append(
            {
                "mode": "pipeline",
                "instances": instances,
                "batch": batch,
                "fps": row.fps,
                "p50_ms": row.p50_ms,
                "p99_ms": row.p99_ms,
            }
        )
        print(
            f"pipeline x{instances:2d} batch {batch:4d}: {row.fps:9.0f} img/s p50 {row.p50_ms:7.2f} ms "
            f"p99 {row.p99_ms:7.2f} ms",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

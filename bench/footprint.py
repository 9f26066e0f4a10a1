"""`python -m bench.footprint`: the agent's idle memory, and what each extra instance costs.

Starts the real agent (a private Mosquitto, EfficientNet-Lite0 on ONNX Runtime) with 1, 2 and 4
instances, waits until it is ready and idle, and prints its resident memory (VmRSS) and which
runtime libraries its process has mapped: the agent should hold only the runtime it serves.

`--throughput` then checks that the memory saved costs no speed: the instances of one tenant share
one ONNX Runtime session, run from one thread each; it measures them against a session per instance,
in alternating rounds in one run, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.devtools.demo import start_agent, wait_ready
from agent.devtools.local_broker import LocalBroker

RUNTIMES = {
    "onnxruntime": "libonnxruntime",
    "torch": "libtorch",
    "openvino": "libopenvino",
    "litert": "litert",
}


def measure(broker_url: str, instances: int, backend: str, settle_s: float) -> tuple[float, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = (
            'log_level = "WARNING"\n[placement]\ngeneration = 0\n[[placement.tenants]]\n'
            f'model = "efficientnet-lite0"\nbackend = "{backend}"\ninstances = {instances}\n'
        )
        agent = start_agent(broker_url, Path(tmp), f"fp{instances}", config)
        try:
            asyncio.run(wait_ready(broker_url, f"fp{instances}"))
            time.sleep(settle_s)  # idle: let start-up garbage be collected before reading RSS
            status = Path(f"/proc/{agent.pid}/status").read_text()
            rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
            maps = Path(f"/proc/{agent.pid}/maps").read_text()
            return rss_kb / 1024, [name for name, lib in RUNTIMES.items() if lib in maps]
        finally:
            agent.terminate()
            agent.wait(30)


def images_per_s(sessions: list[Any], batch: np.ndarray, runs: int) -> float:
    """Raw rate of `sessions` run together, one thread each."""

    def work(session: Any) -> None:
        for _ in range(runs):
            session.infer(batch)

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(sessions) * runs / (time.perf_counter() - start)


def throughput(instances: int, rounds: int = 8, runs: int = 80) -> None:
    """A shared session against a session per instance (each from a backend object of its own)."""
    from agent.service.config import bundled_models_dir
    from agent.service.model_repo import ModelRepository
    from backends.onnxruntime_backend import OnnxRuntimeBackend

    model = ModelRepository(bundled_models_dir()).load("efficientnet-lite0").artifacts
    options = {"threads": 1, "instances": instances}
    shared_backend = OnnxRuntimeBackend()
    shared = [shared_backend.load(model, "cpu", options) for _ in range(instances)]
    separate = [OnnxRuntimeBackend().load(model, "cpu", options) for _ in range(instances)]
    batch = np.random.default_rng(0).random((1, 3, *model.input_size), dtype=np.float32)
    for s in shared + separate:  # ONNX Runtime's arena grows over the first runs
        s.infer(batch)
        s.infer(batch)
    figures: dict[str, list[float]] = {"shared": [], "separate": []}
    for _ in range(rounds):
        figures["shared"].append(images_per_s(shared, batch, runs))
        figures["separate"].append(images_per_s(separate, batch, runs))
    one, each = (statistics.median(figures[k]) for k in ("shared", "separate"))
    print(
        f"\n{instances} instances, raw img/s (median of {rounds} alternating rounds): "
        f"one shared session {one:.0f}, a session each {each:.0f}, ratio {one / each:.2f}"
    )
    for s in shared + separate:
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__)
    parser.add_argument("--instances", default="1,2,4")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading RSS")
    parser.add_argument(
        "--throughput", action="store_true", help="then: shared session against a session per instance"
    )
    args = parser.parse_args(argv)
    print(f"{'instances':>9} {'RSS (MB)':>9} {'vs 1':>7}  runtimes mapped")
    first: float | None = None
    with LocalBroker() as broker:
        for n in (int(x) for x in args.instances.split(",")):
            rss, mapped = measure(broker.url, n, args.backend, args.settle)
            first = rss if first is None else first
            print(f"{n:>9} {rss:>9.1f} {rss - first:>+7.1f}  {', '.join(mapped)}", flush=True)
    if args.throughput and args.backend == "onnxruntime":
        throughput(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

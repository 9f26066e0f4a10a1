"""`python -m bench.footprint`: the agent's idle memory, and what each extra instance costs.

Starts the real agent (a private Mosquitto, EfficientNet-Lite0 on ONNX Runtime) with 1, 2 and 4
instances, waits until it is ready and idle, and prints its resident memory (VmRSS) and which
runtime libraries its process has mapped: the agent should hold only the runtime it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__)
    parser.add_argument("--instances", default="1,2,4")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading RSS")
    args = parser.parse_args(argv)
    print(f"{'instances':>9} {'RSS (MB)':>9} {'vs 1':>7}  runtimes mapped")
    first: float | None = None
    with LocalBroker() as broker:
        for n in (int(x) for x in args.instances.split(",")):
            rss, mapped = measure(broker.url, n, args.backend, args.settle)
            first = rss if first is None else first
            print(f"{n:>9} {rss:>9.1f} {rss - first:>+7.1f}  {', '.join(mapped)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

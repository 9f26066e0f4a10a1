"""`python -m bench.frigate`: the agent as Frigate's `zmq` detector over ipc://, measured as Frigate
uses it (docs/frigate.md).

Throughput: for each backend, the real agent (a private Mosquitto, the bundled COCO detector
mb3-centernet, `--instances` instances) and 1, 2 and 4 clients at once, each a REQ socket that does
what Frigate's detector process does: the model handshake, then one 320x320 RGB uint8 tensor (the
sample photo of a person with her dog) after another, a timeout of `--timeout-ms` (Frigate's 200 ms)
after which the socket is rebuilt and the handshake repeated. Prints requests/s, p50 and p99 of the
round trip, and the requests that timed out.

`--hang`: one client against ONNX Runtime alone without a fault (the machine's own timeouts), then
one client, the tenant placed with candidates OpenVINO CPU then ONNX Runtime CPU, and
OpenVINO made to hang after `--after` frames (EDGE_AGENT_FAULTS). Prints how long Frigate got zero
rows, and how many requests timed out after the failover settled (the first answer with boxes after
the hang began): the target is none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from agent.devtools.demo import start_agent, wait_ready
from agent.devtools.local_broker import LocalBroker

MODEL = "mb3-centernet"
MODEL_NAME = "mobiledet.onnx"  # what Frigate's model.path would be called; mapped to MODEL
SAMPLE = Path(__file__).resolve().parent.parent / "agent" / "samples" / "detection" / "person.jpg"


def tensor(size: int = 320) -> np.ndarray:
    """The sample as Frigate hands a region to its detector: (1, size, size, 3) RGB uint8."""
    from PIL import Image

    image = Image.open(SAMPLE).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, np.uint8)[None])


class Client:
    """One Frigate detector process: a REQ socket, the handshake, timeouts that rebuild the socket."""

    def __init__(self, context: Any, endpoint: str, timeout_ms: int) -> None:
        self.context, self.endpoint, self.timeout_ms = context, endpoint, timeout_ms
        self.socket: Any = None
        self.rebuilds = 0
        self.connect()

    def connect(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.rebuilds += 1
        self.socket = self.context.socket(zmq.REQ)
        for option, value in (
            (zmq.RCVTIMEO, self.timeout_ms),
            (zmq.SNDTIMEO, self.timeout_ms),
            (zmq.LINGER, 0),
        ):
            self.socket.setsockopt(option, value)
        self.socket.connect(self.endpoint)
        self.socket.send_multipart([json.dumps({"model_request": True, "model_name": MODEL_NAME}).encode()])
        self.socket.setsockopt(zmq.RCVTIMEO, 30000)
        try:
            answer = json.loads(self.socket.recv_multipart()[0])
        finally:
            self.socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        if not answer.get("model_loaded"):
            raise RuntimeError(f"handshake answered {answer}")

    def detect(self, data: np.ndarray) -> np.ndarray | None:
        """The (20, 6) rows, or None when the request timed out (Frigate then reports zero rows)."""
        header = json.dumps({"shape": list(data.shape), "dtype": data.dtype.name, "model_type": "ssd"})
        try:
            self.socket.send_multipart([header.encode(), data.tobytes()])
            reply = self.socket.recv_multipart()
        except zmq.Again:
            self.connect()
            return None
        return np.frombuffer(reply[0], np.float32).reshape(20, 6)

    def close(self) -> None:
        self.socket.close(linger=0)


def agent_config(endpoint: str, timeout_ms: int, tenant: str, faults: str = "", stall_s: float = 1.0) -> str:
    return (
        f'log_level = "WARNING"\nfaults = "{faults}"\n'
        f"[failover]\nstall_timeout_s = {stall_s}\n"
        f"[placement]\ngeneration = 1\n[[placement.tenants]]\n{tenant}\n"
        f'[frigate]\nenabled = true\nendpoints = ["{endpoint}"]\nrequest_timeout_ms = {timeout_ms}\n'
        f'[frigate.models]\n"{MODEL_NAME}" = "{MODEL}"\n'
    )


def run_clients(endpoint: str, clients: int, seconds: float, timeout_ms: int) -> dict[str, float]:
    context = zmq.Context()
    data = tensor()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    timeouts = [0] * clients
    start = threading.Barrier(clients + 1)

    def work(index: int) -> None:
        client = Client(context, endpoint, timeout_ms)
        client.detect(data)  # warm: the first request of a socket
        start.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            began = time.perf_counter()
            if client.detect(data) is None:
                timeouts[index] += 1
            else:
                latencies[index].append((time.perf_counter() - began) * 1000.0)
        client.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    context.term()
    every = sorted(x for part in latencies for x in part)
    return {
        "rps": len(every) / elapsed,
        "p50": statistics.median(every) if every else float("nan"),
        "p99": every[min(len(every) - 1, int(len(every) * 0.99))] if every else float("nan"),
        "timeouts": float(sum(timeouts)),
    }


def hang(endpoint: str, seconds: float, timeout_ms: int) -> dict[str, float]:
    """One client through an OpenVINO hang: zero-row time, and timeouts after the failover settled."""
    context = zmq.Context()
    client = Client(context, endpoint, timeout_ms)
    data = tensor()
    outcomes: list[tuple[float, bool]] = []  # (sent at, answered with boxes in time)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent = time.monotonic()
        rows = client.detect(data)
        outcomes.append((sent, rows is not None and bool(rows[:, 1].max() > 0)))
    client.close()
    context.term()
    # The hang is the longest run of requests without boxes; misses outside it are the load's own.
    best, run_start = (0, 0), None
    for i, (_, ok) in enumerate([*outcomes, (0.0, True)]):
        if not ok and run_start is None:
            run_start = i
        elif ok and run_start is not None:
            best = max(best, (i - run_start, run_start), key=lambda r: r[0])
            run_start = None
    length, first = best
    settled = first + length
    return {
        "requests": float(len(outcomes)),
        "misses": float(sum(not ok for _, ok in outcomes)),
        "zero_row_s": (outcomes[settled][0] - outcomes[first][0])
        if length and settled < len(outcomes)
        else 0.0,
        "misses_in_hang": float(length),
        "misses_before": float(sum(not ok for _, ok in outcomes[:first])) if length else 0.0,
        "misses_after_settled": float(sum(not ok for _, ok in outcomes[settled:])),
        "served_after_settled": float(sum(ok for _, ok in outcomes[settled:])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frigate", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["onnxruntime", "openvino"])
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--timeout-ms", type=int, default=200, help="Frigate's request_timeout_ms")
    parser.add_argument("--hang", action="store_true", help="measure a failover during a hang instead")
    parser.add_argument("--after", type=int, default=100, help="--hang: frames served before the hang")
    parser.add_argument(
        "--stall-timeout-s",
        type=float,
        default=1.0,
        help="--hang: failover.stall_timeout_s (above the slowest candidate's worst inference time)",
    )
    args = parser.parse_args(argv)
    devices = {"onnxruntime": "cpu", "openvino": "CPU"}
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        # --hang: first the same client against ONNX Runtime alone, no fault (the machine's own misses).
        runs = ["baseline", "hang"] if args.hang else args.backends
        for run in runs:
            endpoint = f"ipc://{tmp}/{run}.sock"
            if run == "hang":
                tenant = (
                    f'model = "{MODEL}"\ninstances = {args.instances}\ncandidates = '
                    '[{backend = "openvino", device = "CPU"}, {backend = "onnxruntime", device = "cpu"}]'
                )
                faults = f"openvino:CPU:hang:after={args.after}"
            else:
                backend = "onnxruntime" if run == "baseline" else run
                tenant = (
                    f'model = "{MODEL}"\nbackend = "{backend}"\ndevice = "{devices[backend]}"\n'
                    f"instances = {args.instances}"
                )
                faults = ""
            state = Path(tmp) / run
            state.mkdir()
            agent = start_agent(
                broker.url,
                state,
                f"frigate-{run}",
                agent_config(endpoint, args.timeout_ms, tenant, faults, args.stall_timeout_s),
            )
            try:
                asyncio.run(wait_ready(broker.url, f"frigate-{run}", 120))
                if run in ("baseline", "hang"):
                    r = hang(endpoint, args.seconds, args.timeout_ms)
                    if run == "baseline":
                        misses = f"{r['misses']:.0f} of {r['requests']:.0f}"
                        print(f"baseline (ONNX Runtime, no fault): {misses} requests timed out", flush=True)
                    else:
                        print(f"hang: {json.dumps(r)}", flush=True)
                    continue
                for clients in args.clients:
                    r = run_clients(endpoint, clients, args.seconds, args.timeout_ms)
                    print(
                        f"{run:<12} clients={clients} instances={args.instances} {r['rps']:7.1f} req/s  "
                        f"p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms  timeouts {int(r['timeouts'])}",
                        flush=True,
                    )
            finally:
                agent.terminate()
                agent.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`edge-agent bench`: the paper's concurrency experiment, reproduced on the machine it runs on.

For each available backend, instance count and batch size it measures, in one run:
  raw       the runtime in-process on pre-made tensors (the limit),
  pipeline  the agent's tenant in-process (JPEG decode + preprocess + batching + infer),
  e2e       the real agent process behind a real Mosquitto, JPEG frames over MQTT 5,
and once: naive, the script a user writes first (bench/naive_subscriber.py), over the same broker.
Then, per backend, the latency check: unloaded p50, and p99 at 70% of the peak end-to-end rate.
Every end-to-end run is checked against the agent's telemetry: each result counted was an inference
(bench/agent_counters.py), else the run fails. Prints a table with ratios, writes CSV and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from agent.commands.client import read_retained
from agent.devtools.demo import start_agent, wait_ready
from agent.devtools.local_broker import LocalBroker
from agent.frames.ingest import Frame
from agent.frames.preprocess import Preprocessor
from agent.frames.tenant import Tenant
from agent.protocol.broker import parse_broker_url
from agent.protocol.schemas import BatchSpec, Placement, TenantSpec
from agent.protocol.topics import Topics
from agent.service.model_repo import ModelRepository
from backends import registry
from bench.agent_counters import TELEMETRY_CONFIG, AgentCounters, check
from bench.loadgen import LoadGenerator, Tally
from bench.naive_subscriber import spawn

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "agent" / "samples"
MODELS = REPO / "models"
DEVICE = "bench-device"
DEFAULT_DEVICE = {"onnxruntime": "cpu", "openvino": "CPU"}
Precision = Literal["fp32", "fp16", "int8"] | None
# The closed loop keeps 4 x instances x batch + 4 frames in flight (x4 b32: 516): the queue must
# hold them, or the agent sheds the surplus as `overloaded` and the run measures shedding.
BENCH_AGENT_CONFIG = 'log_level = "WARNING"\n[scheduler]\nqueue_depth = 4096\n' + TELEMETRY_CONFIG


def agent_config(cpu_policy: str = "normal") -> str:
    """The benchmark agent's config, with `scheduler.cpu_policy` (docs/performance.md)."""
    return BENCH_AGENT_CONFIG.replace("[scheduler]\n", f'[scheduler]\ncpu_policy = "{cpu_policy}"\n')


@dataclass
class Row:
    backend: str
    device: str
    instances: int
    batch: int
    mode: str
    fps: float
    p50_ms: float
    p99_ms: float
    frames: int
    vs_raw: float | None = None
    vs_naive: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{label[:40]:40s} {elapsed:5.0f}s, ~{eta:4.0f}s left"
        )
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def jpeg_frames(size: int = 224) -> list[bytes]:
    """224-px JPEGs (centre crops of the sample photos), as a camera at that resolution sends."""
    frames = []
    for path in sorted(SAMPLES.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        buf = io.BytesIO()
        image.resize((size, size), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames


def percentiles(latencies: list[float]) -> tuple[float, float]:
    if not latencies:
        return 0.0, 0.0
    arr = np.asarray(latencies)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


# -- (a) raw runtime -----------------------------------------------------------------------------
def measure_raw(
    backend_name: str,
    device: str,
    model: Any,
    instances: int,
    batch: int,
    seconds: float,
    precision: Precision = None,
) -> Row:
    backend = registry.get(backend_name)
    # The options a tenant with this spec passes (Tenant.__init__): the same sessions as the agent's.
    options = {"threads": None, "instances": instances, "precision": precision, "max_batch": batch}
    sessions = [backend.load(model.artifacts, device, options) for _ in range(instances)]
    h, w = model.input.size
    x = np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)
    for s in sessions:
        s.infer(x)
    counts = [0] * instances
    latencies: list[list[float]] = [[] for _ in range(instances)]
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            sessions[i].infer(x)
            latencies[i].append((time.perf_counter() - t0) * 1000.0)
            counts[i] += batch

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(instances)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for s in sessions:
        s.close()
    p50, p99 = percentiles([v for lane in latencies for v in lane])
    return Row(backend_name, device, instances, batch, "raw", sum(counts) / elapsed, p50, p99, sum(counts))


# -- (b) the agent's pipeline in-process ---------------------------------------------------------
def measure_pipeline(
    backend_name: str,
    device: str,
    model: Any,
    instances: int,
    batch: int,
    seconds: float,
    frames: list[bytes],
    precision: Precision = None,
) -> Row:
    spec = TenantSpec(
        model=model.name,
        backend=backend_name,
        device=device,
        instances=instances,
        precision=precision,
        batch=BatchSpec(max_size=batch, max_delay_ms=0.0),
    )
    window = 2 * instances * batch + 2  # enough in flight to keep every instance busy
    slots = threading.Semaphore(window)
    latencies: list[float] = []
    lock = threading.Lock()
    counting = threading.Event()

    def emit(frame: Frame, _outcome: Any) -> None:
        if counting.is_set():
            with lock:
                latencies.append((time.monotonic() - frame.received) * 1000.0)
        slots.release()

    tenant = Tenant(
        spec,
        model,
        registry.get(backend_name),
        emit,
        queue_depth=window * 2,
        overload_policy="reject_new",
        max_pixels=40_000_000,
    )
    tenant.load()
    tenant.start()
    warmup = min(1.0, seconds / 3)
    stop = time.monotonic() + warmup + seconds
    t_start = time.monotonic()
    i = 0
    while time.monotonic() < stop:
        slots.acquire()
        if not counting.is_set() and time.monotonic() > stop - seconds:
            counting.set()
            t_start = time.monotonic()
        tenant.submit(
            Frame(
                request_id=str(i), model=model.name, image=frames[i % len(frames)], received=time.monotonic()
            )
        )
        i += 1
    elapsed = time.monotonic() - t_start
    tenant.drain(10.0)
    p50, p99 = percentiles(latencies)
    return Row(
        backend_name, device, instances, batch, "pipeline", len(latencies) / elapsed, p50, p99, len(latencies)
    )


# -- (c) end to end over MQTT --------------------------------------------------------------------
def generator(
    url: str, device_id: str, model: str | None = None, name: str = "edge-bench-camera"
) -> LoadGenerator:
    b = parse_broker_url(url)
    return LoadGenerator(b.host, b.port, device_id, model, name)


async def apply_placement(
    broker_url: str, generation: int, tenants: list[TenantSpec], device: str = DEVICE
) -> None:
    """Publish a retained placement and wait until the agent reports it applied and ready."""
    import aiomqtt

    doc = Placement(generation=generation, tenants=tenants).model_dump_json()
    b = parse_broker_url(broker_url)
    async with aiomqtt.Client(b.host, b.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.publish(Topics(device).placement, doc, qos=1, retain=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = await read_retained(broker_url, Topics(device).status, 1.0) or {}
        placement = status.get("placement") or {}
        states = [t["state"] for t in placement.get("tenants", [])]
        if placement.get("applied_generation") == generation and states and all(s == "ready" for s in states):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"placement {generation} not applied: {status}")


# -- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    model = ModelRepository(MODELS).load(args.model)
    frames = jpeg_frames(model.input.size[0])
    caps = registry.capabilities()
    backends = [b for b in args.backends if caps.get(b, (False,))[0]]
    skipped = [b for b in args.backends if b not in backends]
    for b in skipped:
        print(f"skipping {b}: {caps.get(b, (False, [], 'unknown backend'))[2]}", file=sys.stderr)
    configs = [
        (b, args.device or DEFAULT_DEVICE.get(b, "cpu"), n, k)
        for b in backends
        for n in args.instances
        for k in args.batch
    ]
    progress = Progress(len(configs) * 3 + 1 + len(backends) * 4)
    rows: list[Row] = []
    checked: list[dict[str, Any]] = []  # the agent's counters against the results, per run

    # Preprocessing cost per frame, beside inference (reported in the notes).
    pre = Preprocessor(model.input, 40_000_000)
    t0 = time.perf_counter()
    for i in range(300):
        pre(frames[i % len(frames)])
    pre_ms = (time.perf_counter() - t0) / 300 * 1000.0

    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        state = Path(tmp)
        log = (state / "agent.log").open("ab")
        agent = start_agent(broker.url, state, DEVICE, agent_config(getattr(args, "cpu_policy", "normal")))
        naive = spawn(broker.port, "naive", args.model, log)
        try:
            _measure_all(broker.url, configs, frames, args, rows, progress, model, checked)
        finally:
            for proc in (agent, naive):
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    _ratios(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "concurrency.csv")
    _print_table(rows, pre_ms)
    _summary(rows, pre_ms, checked, out / "summary.json")
    if not args.no_plot:
        _plot(rows, out / "concurrency.png")
    print(
        f"\nwrote {out / 'concurrency.csv'}, {out / 'summary.json'}"
        + ("" if args.no_plot else f", {out / 'concurrency.png'}")
    )
    return 0


def _measure_all(
    url: str,
    configs: list[tuple[str, str, int, int]],
    frames: list[bytes],
    args: argparse.Namespace,
    rows: list[Row],
    progress: Progress,
    model_obj: Any,
    checked: list[dict[str, Any]],
) -> None:
    """Per configuration raw, pipeline and end to end back to back, so that a machine whose speed
    drifts over minutes (a shared VM) shifts all three alike and the ratios stay honest; then the
    naive baseline and the latency check. End to end: frames from the lean camera
    (bench/loadgen.py) at QoS 0, answers read from the result topic, each run checked against
    the agent's counters."""

    async def both_up() -> None:
        """The agent and the naive script load their models at start: not while raw is measured."""
        await wait_ready(url, DEVICE)
        deadline = time.monotonic() + 60
        while not (await read_retained(url, Topics("naive").status, 1.0) or {}).get("online"):
            if time.monotonic() > deadline:
                raise TimeoutError("the naive subscriber did not come up")
            await asyncio.sleep(0.3)

    asyncio.run(both_up())
    counters = AgentCounters(url, DEVICE)
    try:
        _measure_agent(url, configs, frames, args, rows, progress, model_obj, counters, checked)
    finally:
        counters.close()


def _measure_agent(
    url: str,
    configs: list[tuple[str, str, int, int]],
    frames: list[bytes],
    args: argparse.Namespace,
    rows: list[Row],
    progress: Progress,
    model_obj: Any,
    counters: AgentCounters,
    checked: list[dict[str, Any]],
) -> None:
    """_measure_all's runs, with the agent's telemetry subscribed."""
    model = model_obj.name
    warmup = min(1.0, args.seconds / 3)
    generation = int(time.time())

    def place(backend: str, device: str, instances: int, batch: int) -> None:
        spec = TenantSpec(
            model=model,
            backend=backend,
            device=device,
            instances=instances,
            precision=args.precision,
            batch=BatchSpec(max_size=batch, max_delay_ms=0.0),
        )
        asyncio.run(apply_placement(url, generation, [spec]))

    def errors_noted(tally: Tally, label: str) -> None:
        if tally.errors:
            print(f"\n{label}: error answers {tally.errors}", file=sys.stderr)

    for b, dev, n, k in configs:
        # In-process first; the agent's last tenant is idle meanwhile (no frames, no CPU).
        rows.append(measure_raw(b, dev, model_obj, n, k, args.seconds, args.precision))
        progress.step(f"raw {b} x{n} b{k}")
        rows.append(measure_pipeline(b, dev, model_obj, n, k, args.seconds, frames, args.precision))
        progress.step(f"pipeline {b} x{n} b{k}")
        generation += 1
        place(b, dev, n, k)
        before = counters.read()
        gen = generator(url, DEVICE)
        try:
            # Deeper window than in-process: it must also cover the MQTT round trip.
            fps, tally = gen.closed_loop(frames, 4 * n * k + 4, args.seconds, warmup)
        finally:
            gen.close()
        checked += check(before, counters.read(), {model: tally.results}, f"e2e {b} x{n} b{k}")
        errors_noted(tally, f"e2e {b} x{n} b{k}")
        p50, p99 = percentiles(tally.latencies)
        rows.append(Row(b, dev, n, k, "e2e", fps, p50, p99, len(tally.latencies)))
        progress.step(f"e2e {b} x{n} b{k}")

    gen = generator(url, "naive")
    try:
        fps, tally = gen.closed_loop(frames, 4, args.seconds, warmup)
    finally:
        gen.close()
    p50, p99 = percentiles(tally.latencies)
    rows.append(Row("onnxruntime", "cpu", 1, 1, "naive", fps, p50, p99, len(tally.latencies)))
    progress.step("naive baseline")

    # Latency under load: unloaded p50 vs p99 at 70% of the peak end-to-end rate, per backend for
    # its best configuration and, where that batches, for its best batch-1 configuration too.
    # Longer than the throughput runs: p99 needs enough samples to mean something.
    latency_s = args.latency_seconds or max(2 * args.seconds, 6.0)
    for b in sorted({c[0] for c in configs}):
        e2e = [r for r in rows if r.mode == "e2e" and r.backend == b]
        picks = [max(e2e, key=lambda r: r.fps)]
        single = [r for r in e2e if r.batch == 1]
        if picks[0].batch != 1 and single:
            picks.append(max(single, key=lambda r: r.fps))
        for best in picks:
            label = f"{b} x{best.instances} b{best.batch}"
            generation += 1
            place(b, best.device, best.instances, best.batch)
            before = counters.read()
            gen = generator(url, DEVICE)
            try:
                _, unloaded = gen.closed_loop(frames, 1, args.seconds, warmup)
                progress.step(f"unloaded {label}")
                loaded = gen.open_loop(frames, 0.7 * best.fps, latency_s, min(1.0, latency_s))
                progress.step(f"70% load {label}")
            finally:
                gen.close()
            results = {model: unloaded.results + loaded.results}
            checked += check(before, counters.read(), results, f"latency {label}")
            errors_noted(loaded, f"70% load {label}")
            u50, u99 = percentiles(unloaded.latencies)
            l50, l99 = percentiles(loaded.latencies)
            common = (b, best.device, best.instances, best.batch)
            rows.append(Row(*common, "unloaded", 0.0, u50, u99, len(unloaded.latencies)))
            rows.append(
                Row(
                    *common,
                    "load70",
                    0.7 * best.fps,
                    l50,
                    l99,
                    len(loaded.latencies),
                    extra={"p99_vs_unloaded_p50": l99 / u50 if u50 else None},
                )
            )


def _ratios(rows: list[Row]) -> None:
    raw = {(r.backend, r.instances, r.batch): r.fps for r in rows if r.mode == "raw"}
    naive = next((r.fps for r in rows if r.mode == "naive"), None)
    for r in rows:
        if r.mode in ("raw", "pipeline", "e2e", "naive") and (r.backend, r.instances, r.batch) in raw:
            r.vs_raw = r.fps / raw[(r.backend, r.instances, r.batch)]
        if naive and r.mode in ("raw", "pipeline", "e2e", "naive"):
            r.vs_naive = r.fps / naive


def _write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "backend",
                "device",
                "instances",
                "batch",
                "mode",
                "fps",
                "p50_ms",
                "p99_ms",
                "frames",
                "vs_raw",
                "vs_naive",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.backend,
                    r.device,
                    r.instances,
                    r.batch,
                    r.mode,
                    f"{r.fps:.1f}",
                    f"{r.p50_ms:.2f}",
                    f"{r.p99_ms:.2f}",
                    r.frames,
                    "" if r.vs_raw is None else f"{r.vs_raw:.2f}",
                    "" if r.vs_naive is None else f"{r.vs_naive:.2f}",
                ]
            )


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _print_table(rows: list[Row], pre_ms: float) -> None:
    print(
        f"\n{'backend':12s} {'inst':>4s} {'batch':>5s} {'mode':9s} {'img/s':>8s} {'p50 ms':>8s} "
        f"{'p99 ms':>8s} "
        f"{'vs raw':>7s} {'vs naive':>8s}"
    )
    print("-" * 80)
    for r in rows:
        if r.mode in ("unloaded", "load70"):
            continue
        print(
            f"{r.backend:12s} {r.instances:4d} {r.batch:5d} {r.mode:9s} {r.fps:8.1f} {r.p50_ms:8.2f} "
            f"{r.p99_ms:8.2f} {_fmt(r.vs_raw):>7s} {_fmt(r.vs_naive):>8s}"
        )
    print(f"\npreprocessing (224-px JPEG decode + resize + normalise): {pre_ms:.2f} ms per frame, one core")
    for r in rows:
        if r.mode == "load70":
            unloaded = next(
                u
                for u in rows
                if u.mode == "unloaded"
                and (u.backend, u.instances, u.batch) == (r.backend, r.instances, r.batch)
            )
            print(
                f"{r.backend} x{r.instances} b{r.batch}: unloaded p50 {unloaded.p50_ms:.2f} ms; "
                f"at 70% of its peak ({r.fps:.0f} img/s) "
                f"p99 {r.p99_ms:.2f} ms = {r.extra['p99_vs_unloaded_p50']:.2f}x unloaded p50"
            )


def _summary(rows: list[Row], pre_ms: float, checked: list[dict[str, Any]], path: Path) -> None:
    e2e = [r for r in rows if r.mode == "e2e"]
    naive = next((r for r in rows if r.mode == "naive"), None)
    one = next(
        (
            r
            for r in rows
            if r.mode == "raw" and r.backend == "onnxruntime" and r.instances == 1 and r.batch == 1
        ),
        None,
    )
    best = max(e2e, key=lambda r: r.fps) if e2e else None
    best_raw = max((r for r in rows if r.mode == "raw"), key=lambda r: r.fps, default=None)
    summary: dict[str, Any] = {
        "best_e2e": asdict(best) if best else None,
        "best_raw": asdict(best_raw) if best_raw else None,
        # The fastest end-to-end configuration against the fastest raw one (they may differ).
        "best_e2e_vs_best_raw": best.fps / best_raw.fps if best and best_raw else None,
        "e2e_vs_raw_min": min((r.vs_raw for r in e2e if r.vs_raw), default=None),
        "e2e_vs_raw_by_config": {f"{r.backend} x{r.instances} b{r.batch}": r.vs_raw for r in e2e},
        "best_e2e_vs_naive": best.fps / naive.fps if best and naive else None,
        "best_vs_one_instance_one_thread": best.fps / one.fps if best and one else None,
        "p99_at_70pct_vs_unloaded_p50": {
            f"{r.backend} x{r.instances} b{r.batch}": r.extra.get("p99_vs_unloaded_p50")
            for r in rows
            if r.mode == "load70"
        },
        "preprocess_ms_per_frame": pre_ms,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        # Per end-to-end run: results the camera received, inferences the agent's telemetry counted
        # (frames_out), frames it answered from its duplicate memory. Equal, and 0: or the run fails.
        "agent_counters": checked,
    }
    path.write_text(json.dumps(summary, indent=2))
    print("\nsummary:")
    if best and naive and one:
        print(
            f"  best end to end: {best.backend} x{best.instances} b{best.batch} {best.fps:.0f} img/s = "
            f"{best.fps / naive.fps:.2f}x naive, {best.fps / one.fps:.2f}x one instance one thread (raw)"
        )
    if best and best_raw:
        print(
            f"  best end to end / best raw: {best.fps:.0f} / {best_raw.fps:.0f} img/s "
            f"({best_raw.backend} x{best_raw.instances} b{best_raw.batch}) = "
            f"{summary['best_e2e_vs_best_raw']:.2f}"
        )
    print(
        "  end to end vs raw limit (same backend, instances, batch): "
        + ", ".join(f"{k} {v:.2f}" for k, v in summary["e2e_vs_raw_by_config"].items() if v)
    )
    results = sum(c["results"] for c in checked)
    print(
        f"  agent's counters: {len(checked)} end-to-end runs, {results} results, "
        f"{sum(c['inferences'] for c in checked)} inferences, "
        f"{sum(c['duplicates'] for c in checked)} answered from the duplicate memory"
    )


def _plot(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"raw": ":", "pipeline": "--", "e2e": "-"}
    groups = sorted({(r.backend, r.batch) for r in rows if r.mode in styles})
    palette = ["tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:green", "tab:olive"]
    for index, (backend, batch) in enumerate(groups):
        for mode, style in styles.items():
            pts = sorted(
                (r.instances, r.fps) for r in rows if (r.backend, r.batch, r.mode) == (backend, batch, mode)
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    style,
                    marker="o",
                    color=palette[index % len(palette)],
                    label=f"{backend} batch {batch} {mode}",
                )
    naive = next((r for r in rows if r.mode == "naive"), None)
    if naive:
        ax.axhline(naive.fps, color="grey", linewidth=1)
        ax.text(1, naive.fps * 1.02, f"naive baseline {naive.fps:.0f} img/s", color="grey")
    ax.set_xlabel("instances per tenant")
    ax.set_ylabel("images / s")
    ax.set_title(f"EfficientNet-Lite0, 224-px JPEG, {os.cpu_count()} CPU cores")
    ax.set_xticks(sorted({r.instances for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

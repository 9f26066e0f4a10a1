"""Where a frame's time goes: per-thread CPU and wake-ups per frame, end to end against raw.

    python -m bench.path_profile --backend openvino --instances 1 --batch 1 --seconds 5
    python -m bench.path_profile --configs 1x1,4x8 --rounds 3 --py-spy bench/out/path

For each configuration it measures, back to back in one run, raw (the runtime in-process on
pre-made tensors, the same options the tenant uses) and end to end (the real agent behind a real
Mosquitto, the lean camera of bench/loadgen.py, unique request ids), in alternating rounds, and
reads from /proc, over each end-to-end round, every thread's CPU time and context switches (the
agent's threads by their Python names, the runtime's own threads, Mosquitto, the camera): CPU ms
and voluntary wake-ups per frame. `--py-spy DIR` also records the agent with py-spy (`--threads
--idle`, raw format) during the last round. Every round is checked against the agent's telemetry.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.devtools.demo import wait_ready
from agent.devtools.local_broker import LocalBroker
from agent.protocol.schemas import BatchSpec, TenantSpec
from agent.service.model_repo import ModelRepository
from bench.agent_counters import AgentCounters, check
from bench.concurrency import (
    BENCH_AGENT_CONFIG,
    DEFAULT_DEVICE,
    MODELS,
    REPO,
    agent_config,
    apply_placement,
    generator,
    jpeg_frames,
    measure_raw,
    percentiles,
)

SPY_FORMAT = ["-r", "200", "--format", "raw"]
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


def thread_stats(pid: int) -> dict[int, tuple[str, float, int, int]]:
    """tid -> (comm, CPU ms, voluntary, involuntary context switches) of every thread of `pid`."""
    out: dict[int, tuple[str, float, int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) * TICK_MS
        switches = dict(line.split(":\t") for line in status.splitlines() if "ctxt_switches" in line)
        out[int(task.name)] = (
            comm,
            cpu,
            int(switches["voluntary_ctxt_switches"]),
            int(switches["nonvoluntary_ctxt_switches"]),
        )
    return out


def python_thread_names(pid: int) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` (empty when py-spy is not installed)."""
    exe = Path(sys.executable).with_name("py-spy")
    try:
        text = subprocess.run(
            [str(exe), "dump", "--pid", str(pid), "--json"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        threads = json.loads(text)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}
    return {t["os_thread_id"]: t.get("thread_name") or "?" for t in threads if t.get("os_thread_id")}


def label(name: str) -> str:
    """Group threads: a tenant's instances (`<model>-<i>`), the event loop, the writers, the rest."""
    if name == "MainThread":
        return "event loop (MainThread)"
    if name.startswith("asyncio_"):
        return "asyncio executor"
    for prefix in ("efficientnet", "mobilenet", "mb3"):
        if name.startswith(prefix):
            return "tenant worker (decode, preprocess, infer call, answer)"
    return name


def per_frame(
    before: dict[int, tuple[str, float, int, int]],
    after: dict[int, tuple[str, float, int, int]],
    names: dict[int, str],
    frames: int,
) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for tid, (comm, cpu, vol, invol) in after.items():
        b = before.get(tid, (comm, 0.0, 0, 0))
        key = label(names[tid]) if tid in names else f"runtime/native threads ({comm})"
        g = groups[key]
        g[0] += cpu - b[1]
        g[1] += vol - b[2]
        g[2] += invol - b[3]
    return {
        k: {"cpu_ms": v[0] / frames, "wakeups": v[1] / frames, "preempted": v[2] / frames}
        for k, v in sorted(groups.items())
    }


def process_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_MS


@dataclass
class Variant:
    """One agent under test: its name, the source tree it runs from, its CPU policy."""

    name: str
    source: Path
    cpu_policy: str
    device: str = ""
    proc: subprocess.Popen[bytes] | None = None


def parse_variant(text: str) -> Variant:
    """NAME[:SOURCE[:POLICY]]: SOURCE a checkout to run the agent from (default this one), POLICY
    scheduler.cpu_policy (default normal)."""
    name, source, policy = ([*text.split(":"), "", ""])[:3]
    return Variant(name, Path(source or REPO).resolve(), policy or "normal")


def start_variant(v: Variant, broker_url: str, state: Path) -> None:
    v.device = f"path-{v.name}"
    state.mkdir(parents=True, exist_ok=True)
    # (a checkout older than the option runs with "normal", which it does not name)
    config = BENCH_AGENT_CONFIG if v.cpu_policy == "normal" else agent_config(v.cpu_policy)
    (state / "agent.toml").write_text(config)
    env = {**os.environ, "PYTHONPATH": str(v.source)}
    argv = [sys.executable, "-m", "agent", "run", "--config", str(state / "agent.toml")]
    argv += ["--broker", broker_url, "--device-id", v.device, "--state-dir", str(state)]
    argv += ["--models", str(MODELS)]
    log = (state / "agent.log").open("ab")
    v.proc = subprocess.Popen(argv, cwd=v.source, env=env, stdout=log, stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.path_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--configs", default="1x1,4x8", help="instances x batch, comma separated")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument(
        "--agent",
        action="append",
        type=parse_variant,
        help="NAME[:SOURCE[:POLICY]], repeatable: agents compared round by round (default: this checkout)",
    )
    parser.add_argument("--py-spy", dest="py_spy", default=None, help="folder for py-spy recordings")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    variants: list[Variant] = args.agent or [parse_variant("agent")]

    model = ModelRepository(MODELS).load(args.model)
    frames = jpeg_frames(model.input.size[0])
    device = DEFAULT_DEVICE.get(args.backend, "cpu")
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    results: list[dict[str, Any]] = []
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edge-path-") as tmp:
        try:
            for v in variants:
                start_variant(v, broker.url, Path(tmp) / v.name)
            for v in variants:
                asyncio.run(wait_ready(broker.url, v.device))
            counters = {v.name: AgentCounters(broker.url, v.device) for v in variants}
            generation = int(time.time())
            for instances, batch in configs:
                spec = TenantSpec(
                    model=model.name,
                    backend=args.backend,
                    device=device,
                    instances=instances,
                    batch=BatchSpec(max_size=batch, max_delay_ms=0.0),
                )
                generation += 1
                gens = {}
                names = {}
                window = 4 * instances * batch + 4
                for v in variants:
                    asyncio.run(apply_placement(broker.url, generation, [spec], v.device))
                    gens[v.name] = generator(broker.url, v.device)
                    gens[v.name].closed_loop(frames, window, 1.0, 0.2)  # warm the path
                    names[v.name] = python_thread_names(v.proc.pid)  # type: ignore[union-attr]
                for r in range(args.rounds):
                    raw = measure_raw(args.backend, device, model, instances, batch, args.seconds)
                    label = f"{args.backend} x{instances} b{batch}"
                    print(f"\n{label} round {r}: raw {raw.fps:.0f} img/s, load {os.getloadavg()[0]:.2f}")
                    for v in variants:
                        spy = f"{args.py_spy}/{v.name}-{args.backend}-x{instances}-b{batch}.txt"
                        last = r == args.rounds - 1
                        row = _e2e_round(
                            v,
                            gens[v.name],
                            counters[v.name],
                            names[v.name],
                            broker,
                            frames,
                            window,
                            args.seconds,
                            spy if args.py_spy and last else None,
                            model.name,
                        )
                        row.update(
                            config=label, round=r, raw_fps=raw.fps, e2e_vs_raw=row["e2e_fps"] / raw.fps
                        )
                        results.append(row)
                        _print(row)
                for g in gens.values():
                    g.close()
            for c in counters.values():
                c.close()
        finally:
            for v in variants:
                if v.proc is None:
                    continue
                v.proc.terminate()
                try:
                    v.proc.wait(30)
                except subprocess.TimeoutExpired:
                    v.proc.kill()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def _e2e_round(
    v: Variant,
    gen: Any,
    counters: AgentCounters,
    names: dict[int, str],
    broker: LocalBroker,
    frames: list[bytes],
    window: int,
    seconds: float,
    spy_path: str | None,
    model: str,
) -> dict[str, Any]:
    """One closed-loop run against agent `v`, with its threads' CPU and switches read around it."""
    pid = v.proc.pid  # type: ignore[union-attr]
    broker_pid = broker.proc.pid  # type: ignore[union-attr]
    start = counters.read()
    before, b_broker = thread_stats(pid), process_cpu_ms(broker_pid)
    b_cam, b_wall = os.times(), time.monotonic()
    spy = None
    if spy_path:
        Path(spy_path).parent.mkdir(parents=True, exist_ok=True)
        exe = str(Path(sys.executable).with_name("py-spy"))
        spy = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--threads",
                "--idle",
                "--nonblocking",
                "-r",
                "200",
                "--format",
                "raw",
                "-d",
                str(int(seconds)),
                "-o",
                spy_path,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    fps, tally = gen.closed_loop(frames, window, seconds, 0.0)
    after, a_broker = thread_stats(pid), process_cpu_ms(broker_pid)
    a_cam, wall = os.times(), time.monotonic() - b_wall
    if spy is not None:
        spy.wait(60)
    check(start, counters.read(), {model: tally.results}, f"{v.name}")
    n = tally.results
    table = per_frame(before, after, names, n)
    p50, p99 = percentiles(tally.latencies)
    return {
        "agent": v.name,
        "cpu_policy": v.cpu_policy,
        "e2e_fps": fps,
        "p50_ms": p50,
        "p99_ms": p99,
        "frames": n,
        "wall_ms_per_frame": wall * 1000.0 / n,
        "agent_cpu_ms_per_frame": sum(x["cpu_ms"] for x in table.values()),
        "mosquitto_cpu_ms_per_frame": (a_broker - b_broker) / n,
        "camera_cpu_ms_per_frame": (a_cam.user + a_cam.system - b_cam.user - b_cam.system) * 1000.0 / n,
        "threads": table,
        "loadavg": os.getloadavg(),
    }


def _print(row: dict[str, Any]) -> None:
    print(
        f"  [{row['agent']}] e2e {row['e2e_fps']:.0f} img/s, e2e/raw {row['e2e_vs_raw']:.2f}; "
        f"p50 / p99 {row['p50_ms']:.1f} / {row['p99_ms']:.1f} ms (closed loop); "
        f"wall {row['wall_ms_per_frame']:.2f} ms/frame; load {row['loadavg'][0]:.2f}"
    )
    print(f"  {'thread':58s} {'CPU ms':>7s} {'wake-ups':>8s} {'preempted':>9s}   (per frame)")
    for name, v in row["threads"].items():
        print(f"  {name[:58]:58s} {v['cpu_ms']:7.3f} {v['wakeups']:8.2f} {v['preempted']:9.2f}")
    print(
        f"  {'agent total':58s} {row['agent_cpu_ms_per_frame']:7.3f}\n"
        f"  {'mosquitto':58s} {row['mosquitto_cpu_ms_per_frame']:7.3f}\n"
        f"  {'camera (bench/loadgen.py)':58s} {row['camera_cpu_ms_per_frame']:7.3f}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())

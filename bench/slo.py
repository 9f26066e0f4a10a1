"""`edge-agent bench --slo`: latency objectives under open-loop load, end to end over MQTT.

Per backend (ONNX Runtime, OpenVINO on the CPU), the classifier (--model) and the COCO detector,
one instance each (the classifier batching up to 4 frames with no delay; the detector's graph takes
one frame at a time), in three configurations: the classifier alone,
the detector alone, both together. Measured side by side in one run, against one real agent
behind a real Mosquitto:

1. Unloaded latency of each model alone (a few frames a second): the objectives are chosen from it
   (`objective_for`), unless --objectives names them.
2. The peak of each configuration: one closed loop per model (4 frames in flight), each model's rate.
3. Open-loop load (evenly spaced frames, one camera connection per model) at 50, 80, 100 and 120%
   of each model's peak in that configuration, twice: with the objectives placed (objective-aware
   scheduling) and without (throughput-first, as before). Per model: the share of frames answered
   within the objective (client-measured, arrival at the broker included: stricter than the
   agent's own figure), goodput (frames within the objective per second), p50/p99 of the results,
   frames shed.
4. Priority under a flood: both together, the classifier at 80% of its share and the detector at
   5x its share, as throughput-first / objectives at equal priority / classifier `high` and
   detector `low`: the classifier's share within its objective.
   The last variant again on a third agent with EDGE_AGENT_PRIORITY_GATE=0: priority only within
   each tenant's queue, no gate across the tenants (the scheduling before the gate).
5. The multi-tenant gain (the sum of each model's share of its alone peak; 1.0 = taking turns),
   with the thread budget (docs/protocol.md "Latency objectives") and without it (a second agent
   with EDGE_AGENT_THREAD_BUDGET=0).
6. Goodput of automatic placement (bench/slo_goodput.py), once for all backends.

--slo-stages picks stages 2-3 (scheduling), 4 (flood), 5 (gain), 6 (goodput); stage 1 always runs.
Results go to <out>/slo.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.devtools.demo import start_agent, wait_ready
from agent.devtools.local_broker import LocalBroker
from agent.protocol.broker import parse_broker_url
from agent.protocol.schemas import BatchSpec, Placement, TenantSpec
from agent.protocol.topics import Topics
from agent.service.model_repo import ModelRepository
from backends import registry
from bench.concurrency import BENCH_AGENT_CONFIG, DEFAULT_DEVICE, MODELS, generator, jpeg_frames
from bench.loadgen import Tally
from bench.mixed import DETECTOR, camera_frames

LEVELS = (0.5, 0.8, 1.0, 1.2)
FLOOD = 5.0  # the low priority tenant's load, in multiples of its share
# The examples on this class of CPU; raised where the unloaded latency asks for more.
DEFAULT_OBJECTIVE_MS = {"classifier": 50.0, "detector": 150.0}
DEVICE_ON = "slo-device"
DEVICE_OFF = "slo-device-nobudget"
DEVICE_NOGATE = "slo-device-nogate"
STAGES = ("scheduling", "flood", "gain", "goodput")
CLASSIFIER_BATCH = BatchSpec(max_size=4, max_delay_ms=0.0)


def objective_for(kind: str, p50_ms: float, p99_ms: float) -> float:
    """The objective of a model from its unloaded latency: at least the default, 3x the unloaded p50
    (room for the batch in progress and one ahead of it) and 1.5x the unloaded p99 (the device's own
    jitter), rounded up to 5 ms."""
    ms = max(DEFAULT_OBJECTIVE_MS[kind], 3.0 * p50_ms, 1.5 * p99_ms)
    return float(math.ceil(ms / 5.0) * 5)


def summarise(tally: Tally, objective_ms: float, seconds: float) -> dict[str, Any]:
    lat = np.asarray(tally.latencies, np.float64)
    sent = len(lat) + sum(tally.errors.values())
    within = int((lat <= objective_ms).sum()) if lat.size else 0
    return {
        "sent": sent,
        "within": within,
        "share": round(within / sent, 4) if sent else None,
        "goodput": round(within / seconds, 2),
        "p50": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "p99": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "shed": tally.errors.get("shed", 0),
        "errors": dict(tally.errors),
    }


class Rig:
    """One agent (device id) and the models: place, then drive load per model in parallel."""

    def __init__(self, url: str, device_id: str, frames: Mapping[str, list[bytes]]) -> None:
        self.url = url
        self.device_id = device_id
        self.frames = frames
        self.generation = int(time.time() * 10)

    def place(self, tenants: list[TenantSpec]) -> None:
        self.generation += 1
        asyncio.run(_apply(self.url, self.device_id, self.generation, tenants))

    def _parallel(self, work: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        errors: list[BaseException] = []

        def one(model: str, fn: Any) -> None:
            try:
                out[model] = fn()
            except BaseException as exc:  # re-raised below, on the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=one, args=item) for item in work.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out

    def peak(self, models: list[str], seconds: float) -> dict[str, float]:
        """Each model's rate with 4 frames in flight per model, all at once."""

        def loop(model: str) -> float:
            gen = generator(self.url, self.device_id, model, f"slo-peak-{model}")
            try:
                return gen.closed_loop(self.frames[model], 4, seconds, 1.0)[0]
            finally:
                gen.close()

        return self._parallel({m: (lambda m=m: loop(m)) for m in models})

    def open_loop(self, rates: Mapping[str, float], seconds: float) -> dict[str, Tally]:
        def loop(model: str, rate: float) -> Tally:
            gen = generator(self.url, self.device_id, model, f"slo-open-{model}")
            try:
                return gen.open_loop(self.frames[model], rate, seconds, 1.0)
            finally:
                gen.close()

        return self._parallel({m: (lambda m=m, r=r: loop(m, r)) for m, r in rates.items()})


async def _apply(url: str, device_id: str, generation: int, tenants: list[TenantSpec]) -> None:
    """Publish a retained placement and wait until the agent reports it applied and ready."""
    import aiomqtt

    from agent.commands.client import read_retained

    doc = Placement(generation=generation, tenants=tenants).model_dump_json()
    b = parse_broker_url(url)
    async with aiomqtt.Client(b.host, b.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.publish(Topics(device_id).placement, doc, qos=1, retain=True)
    deadline = time.monotonic() + 180
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = await read_retained(url, Topics(device_id).status, 1.0) or {}
        placement = status.get("placement") or {}
        states = [t["state"] for t in placement.get("tenants", [])]
        applied = placement.get("applied_generation") == generation and len(states) == len(tenants)
        if applied and all(s == "ready" for s in states):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"placement {generation} not applied on {device_id}: {status}")


def run(args: argparse.Namespace) -> int:
    repo = ModelRepository(MODELS)
    classifier = args.model
    kinds = {classifier: "classifier", DETECTOR: "detector"}
    models = {name: repo.load(name) for name in kinds}
    frames = {DETECTOR: camera_frames(), classifier: jpeg_frames(models[classifier].input.size[0])}
    caps = registry.capabilities()
    backends = [b for b in args.backends if caps.get(b, (False,))[0]]
    given = dict(item.split("=", 1) for item in (args.objectives or "").split(",") if "=" in item)
    seconds = args.seconds
    stages = {s.strip() for s in args.slo_stages.split(",") if s.strip()}
    unknown = stages - set(STAGES)
    if unknown:
        raise SystemExit(f"--slo-stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    configs = {f"{classifier} alone": [classifier], f"{DETECTOR} alone": [DETECTOR], "together": list(kinds)}
    result: dict[str, Any] = {
        "load_before": os.getloadavg(),
        "cores": len(os.sched_getaffinity(0)),
        "seconds": seconds,
        "stages": sorted(stages),
        "rounds": args.rounds,
        "backends": {},
    }
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edge-slo-") as tmp:
        # The second agent: each runtime's own threads; the third: no priority gate across tenants.
        agents = {
            device_id: _start(broker.url, Path(tmp) / device_id, device_id, env)
            for device_id, env in (
                (DEVICE_ON, {}),
                (DEVICE_OFF, {"EDGE_AGENT_THREAD_BUDGET": "0"}),
                (DEVICE_NOGATE, {"EDGE_AGENT_PRIORITY_GATE": "0"}),
            )
        }
        try:
            for device_id in agents:
                asyncio.run(wait_ready(broker.url, device_id, 120))
            rigs = Rigs(*(Rig(broker.url, d, frames) for d in (DEVICE_ON, DEVICE_OFF, DEVICE_NOGATE)))
            for backend in backends:
                device = DEFAULT_DEVICE.get(backend, "cpu")
                result["backends"][backend] = _run_backend(
                    rigs, backend, device, kinds, configs, given, seconds, stages, args.rounds
                )
            if "goodput" in stages:
                from bench.slo_goodput import goodput_stage

                objectives = {m: float(given.get(m, DEFAULT_OBJECTIVE_MS[k])) for m, k in kinds.items()}
                result["goodput"] = goodput_stage(rigs.on, kinds, objectives, seconds)
        finally:
            for proc in agents.values():
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    result["load_after"] = os.getloadavg()
    _print(result, kinds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slo.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out / 'slo.json'}")
    return 0


class Rigs:
    """The three agents: the thread budget and the gate (`on`), neither budget (`off`), no gate."""

    def __init__(self, on: Rig, off: Rig, nogate: Rig) -> None:
        self.on, self.off, self.nogate = on, off, nogate


def _start(url: str, state_dir: Path, device_id: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """An agent started with `env` added to this process's environment (the agent inherits it)."""
    state_dir.mkdir()
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return start_agent(url, state_dir, device_id, BENCH_AGENT_CONFIG)
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _say(text: str) -> None:
    sys.stderr.write(f"\r{text:100s}")
    sys.stderr.flush()


def _run_backend(
    rigs: Rigs,
    backend: str,
    device: str,
    kinds: Mapping[str, str],
    configs: Mapping[str, list[str]],
    given: Mapping[str, str],
    seconds: float,
    stages: set[str],
    rounds: int = 1,
) -> dict[str, Any]:
    on = rigs.on

    def spec(model: str, objective: float | None = None, priority: str = "normal") -> TenantSpec:
        return TenantSpec(
            model=model,
            backend=backend,
            device=device,
            batch=CLASSIFIER_BATCH if kinds[model] == "classifier" else BatchSpec(),
            latency_objective_ms=objective,
            priority=priority,  # type: ignore[arg-type]
        )

    out: dict[str, Any] = {"unloaded": {}, "objective_ms": {}, "configs": {}}
    # 1. Unloaded latency, each model alone, a few frames a second.
    for model, kind in kinds.items():
        _say(f"{backend}: unloaded {model}")
        on.place([spec(model)])
        tally = on.open_loop({model: 4.0}, max(seconds, 4.0))[model]
        lat = np.asarray(tally.latencies)
        p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
        out["unloaded"][model] = {"p50": round(p50, 1), "p99": round(p99, 1)}
        out["objective_ms"][model] = float(given[model]) if model in given else objective_for(kind, p50, p99)
    objectives: dict[str, float] = out["objective_ms"]
    # 2 and 3. Peak, then open-loop load at each level, throughput-first and objective-aware.
    for name, chosen in configs.items():
        if "scheduling" not in stages and not (name == "together" and "flood" in stages):
            continue
        _say(f"{backend}: {name} peak")
        on.place([spec(m) for m in chosen])
        peak = on.peak(chosen, seconds)
        entry: dict[str, Any] = {"peak": {m: round(v, 2) for m, v in peak.items()}, "levels": []}
        out["configs"][name] = entry
        for variant in ("throughput-first", "objectives") if "scheduling" in stages else ():
            on.place([spec(m, objectives[m] if variant == "objectives" else None) for m in chosen])
            for level in LEVELS:
                _say(f"{backend}: {name} {variant} {int(level * 100)}%")
                tallies = on.open_loop({m: level * peak[m] for m in chosen}, seconds)
                entry["levels"].append(
                    {
                        "variant": variant,
                        "level": level,
                        "models": {m: summarise(t, objectives[m], seconds) for m, t in tallies.items()},
                    }
                )
    if "flood" in stages:
        together = out["configs"]["together"]["peak"]
        out["flood"] = _flood(rigs, spec, kinds, objectives, together, seconds, rounds)
    on.place([])
    if "gain" in stages:
        out["gain"] = _gain(rigs, backend, spec, kinds, out["configs"], seconds)
    return out


def _flood(
    rigs: Rigs,
    spec: Any,
    kinds: Mapping[str, str],
    objectives: Mapping[str, float],
    together: Mapping[str, float],
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    """4. Priority under a flood of the detector; the last variant with and without the gate."""
    classifier = next(m for m, k in kinds.items() if k == "classifier")
    rates = {m: (0.8 if m == classifier else FLOOD) * together[m] for m in kinds}
    flood: dict[str, Any] = {"rates": {m: round(r, 2) for m, r in rates.items()}, "variants": {}}
    prioritised = [spec(m, objectives[m], "high" if m == classifier else "low") for m in kinds]
    variants = {
        "throughput-first": (rigs.on, [spec(m) for m in kinds]),
        "objectives, equal priority": (rigs.on, [spec(m, objectives[m]) for m in kinds]),
        "classifier high, detector low, no gate": (rigs.nogate, prioritised),
        "classifier high, detector low": (rigs.on, prioritised),
    }
    # A shared machine's bursts move one run's share by more than the variants differ: the variants
    # take turns, `rounds` times, and the share is over every round's frames (each round's beside it).
    pooled: dict[str, dict[str, Tally]] = {v: {m: Tally() for m in kinds} for v in variants}
    per_round: dict[str, list[dict[str, float | None]]] = {v: [] for v in variants}
    for round_ in range(rounds):
        for variant, (rig, tenants) in variants.items():
            _say(f"{tenants[0].backend}: flood, {variant}, round {round_ + 1}/{rounds}")
            rig.place(tenants)
            tallies = rig.open_loop(rates, seconds)
            rig.place([])
            per_round[variant].append(
                {m: summarise(t, objectives[m], seconds)["share"] for m, t in tallies.items()}
            )
            for m, t in tallies.items():
                pooled[variant][m].latencies.extend(t.latencies)
                for code, n in t.errors.items():
                    pooled[variant][m].errors[code] = pooled[variant][m].errors.get(code, 0) + n
    for variant in variants:
        flood["variants"][variant] = {
            m: {**summarise(t, objectives[m], seconds * rounds), "rounds": [r[m] for r in per_round[variant]]}
            for m, t in pooled[variant].items()
        }
    return flood


def _gain(
    rigs: Rigs,
    backend: str,
    spec: Any,
    kinds: Mapping[str, str],
    configs: Mapping[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """5. The multi-tenant gain without the thread budget (the other agent), beside the budget's."""
    on, off = rigs.on, rigs.off
    peaks: dict[str, Mapping[str, float]] = {}
    for name, models in [*((f"{m} alone", [m]) for m in kinds), ("together", list(kinds))]:
        if name in configs:
            peaks[name] = configs[name]["peak"]
            continue
        _say(f"{backend}: {name} peak")
        on.place([spec(m) for m in models])
        peaks[name] = on.peak(models, seconds)
    on.place([])
    together = peaks["together"]
    alone_off: dict[str, float] = {}
    for model in kinds:
        _say(f"{backend}: {model} alone, no thread budget")
        off.place([spec(model)])
        alone_off.update(off.peak([model], seconds))
    _say(f"{backend}: together, no thread budget")
    off.place([spec(m) for m in kinds])
    together_off = off.peak(list(kinds), seconds)
    off.place([])
    alone_on = {m: peaks[f"{m} alone"][m] for m in kinds}
    return {
        "thread budget": round(sum(together[m] / alone_on[m] for m in kinds), 3),
        "runtime defaults": round(sum(together_off[m] / alone_off[m] for m in kinds), 3),
        "peaks": {
            "alone": {m: round(v, 2) for m, v in alone_on.items()},
            "together": {m: round(v, 2) for m, v in together.items()},
        },
        "peaks_no_budget": {
            "alone": {m: round(v, 2) for m, v in alone_off.items()},
            "together": {m: round(v, 2) for m, v in together_off.items()},
        },
    }


def _print(result: Mapping[str, Any], kinds: Mapping[str, str]) -> None:
    print(f"\n\ncores {result['cores']}, load average before {result['load_before']}")
    for backend, data in result["backends"].items():
        print(f"\n== {backend}")
        for model in kinds:
            u = data["unloaded"][model]
            print(
                f"{model:20s} unloaded p50 {u['p50']:.1f} ms, p99 {u['p99']:.1f} ms -> objective "
                f"{data['objective_ms'][model]:g} ms"
            )
        print(
            f"\n{'configuration':28s} {'variant':18s} {'load':>5s} {'model':20s} {'share':>7s} "
            f"{'goodput':>8s} {'p50':>7s} {'p99':>8s} {'shed':>5s}"
        )
        for name, entry in data["configs"].items():
            peaks = ", ".join(f"{m} {v:.1f}/s" for m, v in entry["peak"].items())
            print(f"{name} (peak: {peaks})")
            for row in entry["levels"]:
                for model, s in row["models"].items():
                    print(
                        f"{'':28s} {row['variant']:18s} {int(row['level'] * 100):4d}% {model:20s} "
                        f"{_pct(s['share']):>7s} {s['goodput']:8.1f} {_ms(s['p50']):>7s} "
                        f"{_ms(s['p99']):>8s} {s['shed']:5d}"
                    )
        if "flood" in data:
            rates = ", ".join(f"{m} {r:.1f}/s" for m, r in data["flood"]["rates"].items())
            print(f"\nflood ({rates}):")
            for variant, models in data["flood"]["variants"].items():
                cells = "; ".join(
                    f"{m} {_pct(s['share'])} within (rounds {', '.join(map(_pct, s['rounds']))}), "
                    f"p99 {_ms(s['p99'])}, shed {s['shed']}"
                    for m, s in models.items()
                )
                print(f"  {variant:45s} {cells}")
        if "gain" in data:
            gain = data["gain"]
            print(
                f"multi-tenant gain: {gain['thread budget']:.2f} with the thread budget, "
                f"{gain['runtime defaults']:.2f} with each runtime's own threads "
                f"(peaks alone {gain['peaks']['alone']}, together {gain['peaks']['together']}; "
                f"no budget: alone {gain['peaks_no_budget']['alone']}, "
                f"together {gain['peaks_no_budget']['together']})"
            )
    if "goodput" in result:
        from bench.slo_goodput import print_goodput

        print_goodput(result["goodput"])


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}"

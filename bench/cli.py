"""`edge-agent bench` / `python -m bench`: the concurrency benchmark (--placement, --mixed, --slo...).

The benchmark modules import nothing from here (no import cycle): `python -m bench` runs this.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`edge-agent bench` options."""
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["onnxruntime", "openvino"])
    parser.add_argument("--instances", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per configuration")
    parser.add_argument(
        "--latency-seconds",
        type=float,
        help="measured seconds of the 70%% load runs (default: twice --seconds, at least 6)",
    )
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument(
        "--device", help="one device for every backend (e.g. cuda:0); default: each one's CPU"
    )
    parser.add_argument(
        "--precision", choices=["fp32", "fp16", "int8"], help="tenant precision (e.g. fp16 on a GPU)"
    )
    parser.add_argument(
        "--cpu-policy",
        choices=["normal", "batch"],
        default="normal",
        help="the agent's scheduler.cpu_policy (docs/performance.md#where-a-frames-time-goes)",
    )
    parser.add_argument("--out", default="bench/out", help="folder for CSV, summary and plot")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--placement",
        action="store_true",
        help="instead: the placement benchmark (two models, same backend vs spread vs auto)",
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="instead: the COCO detector and --model together vs each alone (raw, pipeline, e2e, naive)",
    )
    parser.add_argument(
        "--cascade",
        action="store_true",
        help="instead: --model on the COCO detector's boxes (1, 5, 10 crops) vs the detector alone",
    )
    parser.add_argument(
        "--slo",
        action="store_true",
        help="instead: latency objectives under open-loop load (classifier, detector, both; priorities)",
    )
    parser.add_argument(
        "--objectives",
        help="--slo: objectives in ms, e.g. efficientnet-lite0=50,mb3-centernet=150 (default: from "
        "the unloaded latency)",
    )
    parser.add_argument(
        "--slo-stages",
        default="scheduling,flood,gain,goodput",
        help="--slo: which stages to run, of scheduling (the load levels), flood (priority under a "
        "flood), gain (multi-tenant gain), goodput (objective-aware vs throughput-only auto placement)",
    )
    parser.add_argument("--inflight", type=int, default=2, help="--cascade: frames outstanding")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="--cascade, --slo (flood stage): alternating rounds of every configuration",
    )


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="concurrency benchmark: raw runtime vs pipeline vs MQTT vs naive"
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    from bench.agent_counters import exit_status

    if args.placement:
        from bench.placement import run as run_placement

        return exit_status(lambda: run_placement(args))
    if args.cascade:
        from bench.cascade import run as run_cascade

        return exit_status(lambda: run_cascade(args))
    if args.slo:
        from bench.slo import run as run_slo

        return exit_status(lambda: run_slo(args))
    if args.mixed:
        from bench.mixed import run as run_mixed

        return exit_status(lambda: run_mixed(args))
    from bench.concurrency import run

    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

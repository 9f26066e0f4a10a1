"""`edge-console rollout`: staged rollouts from a shell, through the REST API (docs/fleet.md#rollouts).

    edge-console rollout create --selector site=north --model efficientnet-lite0 --set version=1.1.0
                                [--waves 1,10%,50%,all] [--soak 60] [--manual] [--max-error-rate 0.01]
                                [--max-p95-factor 1.5] [--min-throughput 0.7] [--allow-failover] [--wait]
    edge-console rollout status [ID] [--json]
    edge-console rollout pause|resume|approve|abort|rollback ID
    edge-console rollout tags DEVICE [key=value ...]     (console-assigned tags; none: show them)

The token and URL are those of `edge-console models` (`--token`/`EDGE_CONSOLE_TOKEN`,
`--url`/`EDGE_CONSOLE_URL`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from cloud_console.models_cli import ApiError, call

OPS = ("pause", "resume", "approve", "abort", "rollback")
DONE = ("completed", "rolled_back", "aborted")


def _value(text: str) -> Any:
    """`--set` values: JSON where it parses (numbers, lists, objects), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def spec_of(args: argparse.Namespace) -> dict[str, Any]:
    change: dict[str, Any]
    if args.placement:
        with open(args.placement, encoding="utf-8") as f:
            doc = json.load(f)
        change = {"tenants": doc["tenants"] if isinstance(doc, dict) else doc}
    elif args.model:
        sets = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ApiError(f"--set {item!r}: expected FIELD=VALUE")
            sets[key.strip()] = _value(value.strip()) if key.strip() != "version" else value.strip()
        change = {"model": args.model, "set": sets}
    else:
        raise ApiError("give --model (with --set FIELD=VALUE) or --placement FILE")
    gates: dict[str, Any] = {"soak_s": args.soak}
    for key, value in (
        ("max_error_rate", args.max_error_rate),
        ("max_p95_factor", args.max_p95_factor),
        ("min_throughput_ratio", args.min_throughput),
        ("apply_timeout_s", args.apply_timeout),
    ):
        if value is not None:
            gates[key] = value
    if args.allow_failover:
        gates["allow_failover"] = True
    return {
        "name": args.name,
        "selector": args.selector,
        "change": change,
        "waves": args.waves,
        "gates": gates,
        "promotion": "manual" if args.manual else "auto",
    }


def show(detail: dict[str, Any]) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(detail["counts"].items()))
    print(
        f"{detail['id']}  {detail['state']}  wave {detail['current_wave'] + 1}/{detail['waves']}  ({counts})"
    )
    if detail.get("reason"):
        print(f"  {detail['reason']}")
    for wave in detail.get("wave_list", []):
        figures = {k: v for k, v in wave["figures"].items() if k.startswith("worst_") and v is not None}
        extra = "  " + ", ".join(f"{k[6:]} {v}" for k, v in figures.items()) if figures else ""
        size = f"{len(wave['devices'])} devices"
        print(f"  wave {wave['index'] + 1} ({wave['size']}): {size}, {wave['state']}{extra}")
    for event in detail.get("timeline", [])[-8:]:
        print(f"  {time.strftime('%H:%M:%S', time.localtime(event['ts']))} {event['message']}")


def cmd_rollout(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("EDGE_CONSOLE_URL") or "http://127.0.0.1:8080"
    token = args.token or os.environ.get("EDGE_CONSOLE_TOKEN")
    if not token:
        print("edge-console rollout: give --token or set EDGE_CONSOLE_TOKEN (an API token)", file=sys.stderr)
        return 2
    try:
        if args.action == "create":
            body = json.dumps(spec_of(args)).encode()
            detail = call(url, token, "POST", "/api/rollouts", body, "application/json")
            show(detail)
            while args.wait and detail["state"] not in DONE:
                time.sleep(2.0)
                detail = call(url, token, "GET", f"/api/rollouts/{detail['id']}")
            if args.wait:
                show(detail)
                return 0 if detail["state"] == "completed" else 1
        elif args.action == "status":
            if args.id:
                detail = call(url, token, "GET", f"/api/rollouts/{args.id}")
                print(json.dumps(detail, indent=2)) if args.json else show(detail)
            else:
                rows = call(url, token, "GET", "/api/rollouts")
                if args.json:
                    print(json.dumps(rows, indent=2))
                for r in [] if args.json else rows:
                    counts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
                    print(f"{r['id']}  {r['state']:16s} {r['selector']:20s} {counts}")
        elif args.action == "tags":
            if args.tags:
                tags = dict(t.partition("=")[::2] for t in args.tags)
                body = json.dumps({"tags": tags}).encode()
                doc = call(url, token, "PUT", f"/api/devices/{args.device}/tags", body, "application/json")
            else:
                doc = call(url, token, "GET", f"/api/devices/{args.device}/tags")
            print(" ".join(f"{k}={v}" for k, v in sorted(doc["tags"].items())) or "(no tags)")
        else:
            summary = call(url, token, "POST", f"/api/rollouts/{args.id}/{args.action}")
            print(f"{summary['id']}: {summary['state']}")
    except (ApiError, OSError, ValueError, KeyError) as exc:
        print(f"edge-console rollout: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: Any) -> None:
    rollout = sub.add_parser(
        "rollout", help="staged rollouts: create, status, pause, resume, abort (REST API)"
    )
    rollout.add_argument("--url", help="the console (default $EDGE_CONSOLE_URL, else http://127.0.0.1:8080)")
    rollout.add_argument("--token", help="an API token (default $EDGE_CONSOLE_TOKEN)")
    actions = rollout.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="start a rollout")
    create.add_argument("--selector", default="*", help="which devices: site=north,hw=jetson, id=cam-*")
    create.add_argument("--model", help="change this tenant (with --set)")
    create.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="e.g. version=1.1.0"
    )
    create.add_argument("--placement", help="a JSON file: a whole placement (tenants) to roll out instead")
    create.add_argument("--name", default="")
    create.add_argument("--waves", default="1,10%,50%,all", help="counts, shares of the target, or all")
    create.add_argument(
        "--soak", type=float, default=60.0, help="seconds each device serves before its gates"
    )
    create.add_argument("--manual", action="store_true", help="each next wave waits for `approve`")
    create.add_argument("--max-error-rate", type=float)
    create.add_argument("--max-p95-factor", type=float)
    create.add_argument("--min-throughput", type=float, help="fps after / fps before, at least")
    create.add_argument("--apply-timeout", type=float)
    create.add_argument("--allow-failover", action="store_true")
    create.add_argument("--wait", action="store_true", help="until it completes (exit 0) or stops (exit 1)")
    status = actions.add_parser("status", help="every rollout, or one with its waves and timeline")
    status.add_argument("id", nargs="?")
    status.add_argument("--json", action="store_true")
    for op in OPS:
        actions.add_parser(op, help=f"{op} a rollout").add_argument("id")
    tags = actions.add_parser("tags", help="show or set the tags the console assigns to a device")
    tags.add_argument("device")
    tags.add_argument("tags", nargs="*", metavar="KEY=VALUE")
    rollout.set_defaults(func=cmd_rollout)

"""`edge-agent bench --slo`, stage 6: goodput of automatic placement, throughput-only vs objective-aware.

The classifier and the COCO detector placed together with `backend: "auto"` on one agent, the
same open-loop mixed load for every variant, side by side in one run:

- **throughput-only** (today without objectives): auto placement without objectives picks the
  backends with the most frames per second in total, and the tenants serve throughput-first;
- **throughput-only placement, objectives served**: the same backends, placed explicitly with
  the objectives (so only the placement differs from the next one);
- **objective-aware**: auto placement with the objectives, which counts only the answers within
  them (agent/placement/auto.py `goodput`), serving with them.

The load: each model at 80% and 120% of its peak under the throughput-only choice (a closed loop
per model, both at once). Goodput is frames answered within the objective per second, measured by
the camera (broker hops included). The profiles the agent measures are cached in its state
directory, so both auto placements decide from the same measurements.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from agent.protocol.schemas import BatchSpec, TenantSpec
from agent.protocol.topics import Topics

LEVELS = (0.8, 1.2)


def goodput_stage(
    rig: Any, kinds: Mapping[str, str], objectives: Mapping[str, float], seconds: float
) -> dict[str, Any]:
    from bench.slo import CLASSIFIER_BATCH, _say, summarise

    def spec(model: str, backend: str, device: str, objective: float | None) -> TenantSpec:
        return TenantSpec(
            model=model,
            backend=backend,
            device=device,
            batch=CLASSIFIER_BATCH if kinds[model] == "classifier" else BatchSpec(),
            latency_objective_ms=objective,
        )

    def auto(objective: bool) -> list[TenantSpec]:
        return [spec(m, "auto", "cpu", objectives[m] if objective else None) for m in kinds]

    out: dict[str, Any] = {"objective_ms": dict(objectives), "choices": {}, "levels": []}
    _say("goodput: auto placement, throughput only")
    rig.place(auto(False))
    out["choices"]["throughput-only"] = throughput = _choices(rig)
    peak = rig.peak(list(kinds), seconds)
    out["peak"] = {m: round(v, 2) for m, v in peak.items()}
    rig.place([])
    _say("goodput: auto placement, objective-aware")
    rig.place(auto(True))
    out["choices"]["objective-aware"] = _choices(rig)
    rig.place([])
    where = {m: throughput[m]["serving"].split(":", 1) for m in kinds}
    explicit = [spec(m, where[m][0], where[m][1], objectives[m]) for m in kinds]
    variants = {
        "throughput-only": auto(False),
        "throughput-only placement, objectives served": explicit,
        "objective-aware": auto(True),
    }
    for level in LEVELS:
        rates = {m: level * peak[m] for m in kinds}
        row: dict[str, Any] = {"level": level, "rates": {m: round(r, 2) for m, r in rates.items()}}
        for variant, tenants in variants.items():
            _say(f"goodput: {variant} at {int(level * 100)}%")
            rig.place(tenants)
            tallies = rig.open_loop(rates, seconds)
            rig.place([])
            models = {m: summarise(t, objectives[m], seconds) for m, t in tallies.items()}
            row[variant] = {"models": models, "goodput": round(sum(s["goodput"] for s in models.values()), 2)}
        base = row["throughput-only"]["goodput"]
        same = row["throughput-only placement, objectives served"]["goodput"]
        aware = row["objective-aware"]["goodput"]
        row["ratio"] = round(aware / base, 3) if base else None
        row["ratio_placement_only"] = round(aware / same, 3) if same else None
        out["levels"].append(row)
    return out


def _choices(rig: Any) -> dict[str, dict[str, Any]]:
    """Per model: where auto placed it, why, and the figures it chose from (status `auto`)."""
    from agent.commands.client import read_retained

    status = asyncio.run(read_retained(rig.url, Topics(rig.device_id).status, 2.0)) or {}
    out: dict[str, dict[str, Any]] = {}
    for t in (status.get("placement") or {}).get("tenants", []):
        choice = t.get("auto") or {}
        out[t["model"]] = {
            "serving": f"{t['backend']}:{t['device']}",
            "threads": t.get("threads"),
            "reason": choice.get("reason"),
            "solo": choice.get("candidates"),
            "together": choice.get("together"),
        }
    return out


def print_goodput(data: Mapping[str, Any]) -> None:
    objectives = ", ".join(f"{m} {v:g} ms" for m, v in data["objective_ms"].items())
    print(f"\n== goodput of automatic placement (objectives {objectives})")
    for variant, choices in data["choices"].items():
        picks = ", ".join(f"{m} on {c['serving']} ({c['threads']} threads)" for m, c in choices.items())
        print(f"  {variant:18s} placed {picks}")
        for m, c in choices.items():
            print(f"    {m}: solo {c['solo']}; together {c['together']}")
    for row in data["levels"]:
        rates = ", ".join(f"{m} {r:.1f}/s" for m, r in row["rates"].items())
        print(f"  load {int(row['level'] * 100)}% of the throughput-only peak ({rates}):")
        for variant in ("throughput-only", "throughput-only placement, objectives served", "objective-aware"):
            entry = row[variant]
            cells = "; ".join(
                f"{m} {s['goodput']:.1f}/s ({100 * (s['share'] or 0):.1f}% within, shed {s['shed']})"
                for m, s in entry["models"].items()
            )
            print(f"    {variant:46s} goodput {entry['goodput']:6.1f}/s  {cells}")
        print(
            f"    objective-aware / throughput-only: {row['ratio']}; "
            f"placement alone (both serving with objectives): {row['ratio_placement_only']}"
        )

"""What whole fleet rows cost console processes of a shared group (cloud_console/shared_telemetry.py).

A private PostgreSQL; a console (`Console`, not started: no MQTT) that knows a fleet of simulated
devices, as process B; a second store as process A. Every second, one second's telemetry of the
fleet (devices / interval messages, the simulator's payloads) is stored, each message by A or B at
random (the broker's shared subscription); every `--refresh` seconds B reads what A stored and
applies it to its fleet rows, as the console's refresh task does. Prints, per refresh, the time
and this thread's CPU for the read (the queries and the parsing) and for applying the rows (on the
event loop in the console), the rows in the window and those fetched; and each store's flush time
with the latest-telemetry rows against a store that stores A's share without them, side by side
(the flushes run one after the other here: no lock waits between processes).

    python -m bench.shared_telemetry --devices 10000 --interval 5 --duration 30
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any

from bench.local_postgres import PostgresServer, server_binaries
from cloud_console.config import ConsoleConfig
from cloud_console.service import Console
from cloud_console.simulator import PROFILES, SimDevice
from cloud_console.store import ConsoleStore


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def _flush(store: ConsoleStore) -> float:
    started = time.perf_counter()
    with store.connect() as conn:
        store.flush(conn)
    return (time.perf_counter() - started) * 1000.0


def run(
    server: PostgresServer, devices: int, interval: float, duration: float, refresh: float
) -> dict[str, Any]:
    database = server.fresh_database()
    config = ConsoleConfig.model_validate({"shared_group": "console", "storage": {"database": database}})
    console = Console(config)  # process B: its store keeps the latest rows, its reader reads A's
    store_b = console.store
    store_b.create_schema(store_b.connect())
    store_a = ConsoleStore(console.engine, retention_s=1e9)
    store_a.share_as = "process-a"
    plain = ConsoleStore(server.fresh_database(), retention_s=1e9)  # the same messages, no latest rows
    plain.create_schema(plain.connect())
    rng = random.Random(1)
    sims = [
        SimDevice(f"sim-{i:05d}", PROFILES[i % len(PROFILES)], random.Random(rng.random()))
        for i in range(devices)
    ]
    now = time.time()
    for sim in sims:
        device = console.fleet.get_or_add(sim.device_id, now)
        device.status = sim.status()
        device.placement = device.status.placement
        device.touch()
    fleet = console.fleet.devices

    def held(device_id: str) -> float | None:
        device = fleet.get(device_id)
        return device.telemetry.ts if device is not None and device.telemetry is not None else None

    shared = console.shared
    if shared is None:
        raise RuntimeError("the console reads no shared telemetry without a shared group")
    # The start: B reads the whole fleet's latest rows once (every device sent once, stored by A).
    for sim in sims:
        telemetry = sim.telemetry(interval)
        store_a.add_telemetry(sim.device_id, telemetry, telemetry.model_dump_json().encode(), time.time())
    _flush(store_a)
    cpu, started = time.thread_time(), time.perf_counter()
    found = shared.read(held)
    first = {"ms": (time.perf_counter() - started) * 1000.0, "cpu_ms": (time.thread_time() - cpu) * 1000.0}
    first["applied"] = console.apply_shared(found, time.time())

    per_second = devices / interval
    flush_a: list[float] = []
    flush_b: list[float] = []
    flush_plain: list[float] = []
    reads: list[dict[str, float]] = []
    sent = 0
    next_refresh = time.monotonic() + refresh
    end = time.monotonic() + duration
    tick = 0
    while time.monotonic() < end:
        second_started = time.monotonic()
        count = int(per_second)
        for k in range(count):
            sim = sims[(tick * count + k) % devices]
            telemetry = sim.telemetry(interval)
            payload = telemetry.model_dump_json().encode()
            store = store_a if rng.random() < 0.5 else store_b
            store.add_telemetry(sim.device_id, telemetry, payload, time.time())
            if store is store_a:  # A's share again, on a store that keeps no latest rows
                plain.add_telemetry(sim.device_id, telemetry)
            sent += 1
        tick += 1
        flush_a.append(_flush(store_a))
        flush_b.append(_flush(store_b))
        flush_plain.append(_flush(plain))
        if time.monotonic() >= next_refresh:
            next_refresh += refresh
            cpu, started = time.thread_time(), time.perf_counter()
            found = shared.read(held)
            read_ms, read_cpu = (time.perf_counter() - started) * 1000.0, (time.thread_time() - cpu) * 1000.0
            cpu, started = time.thread_time(), time.perf_counter()
            applied = console.apply_shared(found, time.time())
            apply_ms, apply_cpu = (
                (time.perf_counter() - started) * 1000.0,
                (time.thread_time() - cpu) * 1000.0,
            )
            reads.append(
                {
                    "read_ms": read_ms,
                    "read_cpu_ms": read_cpu,
                    "apply_ms": apply_ms,
                    "apply_cpu_ms": apply_cpu,
                    "window": shared.last_changed,
                    "fetched": shared.last_fetched,
                    "applied": applied,
                }
            )
        time.sleep(max(0.0, 1.0 - (time.monotonic() - second_started)))
    console.engine.dispose()
    plain.engine.dispose()
    return {
        "first": first,
        "reads": reads,
        "flush_a": flush_a,
        "flush_b": flush_b,
        "plain": flush_plain,
        "sent": sent,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between a device's messages")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument(
        "--refresh", type=float, default=2.0, help="seconds between two reads (the console's)"
    )
    args = parser.parse_args(argv)
    bin_dir = server_binaries()
    if bin_dir is None:
        print("no PostgreSQL server binaries (make deps installs Debian's postgresql)", file=sys.stderr)
        return 2
    with PostgresServer(bin_dir) as server:
        out = run(server, args.devices, args.interval, args.duration, args.refresh)
    first, reads = out["first"], out["reads"]
    print(f"{args.devices} devices, one message each every {args.interval:g} s ({out['sent']} stored)")
    print(
        f"first read (the whole fleet): {first['ms']:.0f} ms, {first['cpu_ms']:.0f} ms CPU,"
        f" {first['applied']} rows applied"
    )
    if reads:
        print(f"refresh every {args.refresh:g} s, {len(reads)} reads (median / p90 / max):")
        for key in ("read_ms", "read_cpu_ms", "apply_ms", "apply_cpu_ms", "window", "fetched", "applied"):
            values = [r[key] for r in reads]
            print(f"  {key:13s} {statistics.median(values):8.1f} {_pct(values, 0.9):8.1f} {max(values):8.1f}")
        cpu = sum(r["read_cpu_ms"] + r["apply_cpu_ms"] for r in reads) / (len(reads) * args.refresh * 1000.0)
        print(f"  console CPU for the refresh: {cpu * 100:.1f} % of one core")
    for name, key in (
        ("A (latest rows)", "flush_a"),
        ("B (latest rows)", "flush_b"),
        ("A, no latest rows", "plain"),
    ):
        values = out[key]
        print(f"flush {name:16s} median {statistics.median(values):6.1f} ms, max {max(values):6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

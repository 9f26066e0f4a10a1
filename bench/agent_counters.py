"""The agent's own count of inferences, read from its telemetry, against the answers a benchmark counted.

The agent answers a request id it has served recently from memory, without running the model
(docs/protocol.md, "Duplicates"). A benchmark that sends an id twice therefore counts answers that
cost no inference, and reports rates above the runtime's limit. So every benchmark run is checked:
between a telemetry taken before it and one taken after its last answer, each tenant's `frames_out`
(results it served) must have grown by exactly the results the benchmark counted for its model, and
`duplicates` (frames not run again) must not have grown. Only the published telemetry JSON is read
(docs/protocol.md#telemetry): the benchmark sees the agent as any consumer does.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.broker import parse_broker_url
from agent.protocol.topics import Topics

# Telemetry once a second in the benchmarks' agents (5 s by default): a check waits for the next one.
TELEMETRY_CONFIG = "[metrics]\ntelemetry_interval_s = 1.0\n"


class CountMismatch(Exception):
    """The agent's counters do not match the answers the benchmark counted: the run measured
    something other than inference (answers from the duplicate memory, a restarted tenant)."""


@dataclass(frozen=True)
class Counts:
    """One telemetry message, reduced to what the check needs."""

    ts: float
    duplicates: int
    served: dict[str, int]  # model -> frames_out of the tenant serving it
    tenants: dict[str, str]  # model -> "backend:device xN" (a changed one was restarted)


def counts_of(telemetry: Mapping[str, Any]) -> Counts:
    tenants = telemetry.get("tenants") or []
    return Counts(
        ts=float(telemetry["ts"]),
        duplicates=int(telemetry.get("duplicates") or 0),
        served={t["model"]: int(t["frames_out"]) for t in tenants},
        tenants={t["model"]: f"{t['backend']}:{t['device']} x{t.get('instances', 1)}" for t in tenants},
    )


def check(before: Counts, after: Counts, answered: Mapping[str, int], label: str) -> list[dict[str, Any]]:
    """Raise CountMismatch unless every result counted in `answered` (model -> results the benchmark
    received between the two telemetry messages) was an inference the agent counted. Returns what
    was compared, per model, for the benchmark's summary."""
    problems = []
    repeats = after.duplicates - before.duplicates
    if repeats:
        problems.append(f"{repeats} frames were answered from the duplicate memory, not run")
    checked: list[dict[str, Any]] = []
    for model, results in sorted(answered.items()):
        if model not in after.served:
            problems.append(f"no tenant serves {model} in the agent's telemetry")
            continue
        if before.tenants.get(model) != after.tenants[model]:
            problems.append(f"the tenant of {model} changed during the run ({after.tenants[model]})")
            continue
        inferences = after.served[model] - before.served.get(model, 0)
        checked.append(
            {
                "run": label,
                "model": model,
                "results": results,
                "inferences": inferences,
                "duplicates": repeats,
            }
        )
        if inferences != results:
            problems.append(f"{model}: {results} results counted, {inferences} inferences served")
    if problems:
        raise CountMismatch(
            f"{label}: the agent's counters disagree with the benchmark: " + "; ".join(problems)
        )
    return checked


def exit_status(main: Callable[[], int]) -> int:
    """Run a benchmark's main: a count mismatch ends it with its message and status 1, no figures."""
    try:
        return main()
    except CountMismatch as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 1


class AgentCounters:
    """A subscription to one agent's telemetry for the life of a benchmark."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        self._cond = threading.Condition()
        self._latest: Counts | None = None
        b = parse_broker_url(broker_url)
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(b.host, b.port)
        self._client.loop_start()
        self._client.subscribe(Topics(device_id).telemetry, qos=1)
        if not subscribed.wait(10):
            self.close()
            raise TimeoutError(f"no SUBACK for {device_id}'s telemetry")

    def _on_message(self, _c: object, _u: object, message: paho.MQTTMessage) -> None:
        counts = counts_of(json.loads(message.payload))
        with self._cond:
            self._latest = counts
            self._cond.notify_all()

    def read(self, timeout_s: float = 30.0) -> Counts:
        """The first telemetry the agent makes after this call (so it counts every answer already
        received: a tenant counts a result before publishing it)."""
        since = time.time()
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._latest is not None and self._latest.ts >= since, timeout_s
            ):
                raise TimeoutError(f"no telemetry from the agent for {timeout_s:g} s")
            latest = self._latest
        if latest is None:  # (the wait above returned only once it was set)
            raise TimeoutError("no telemetry")
        return latest

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

"""The benchmarks measure inference: no request id repeats, and the agent's own counters agree.

The agent answers an id it served recently from memory (docs/protocol.md, "Duplicates"); a benchmark
that sent the same ids again counted those answers as throughput (issue 24). Against the real agent
and a real Mosquitto: the smallest `edge-agent bench` run, and the check on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.devtools.local_broker import LocalBroker
from bench import loadgen
from bench.agent_counters import TELEMETRY_CONFIG, AgentCounters, CountMismatch, check
from bench.concurrency import jpeg_frames
from bench.loadgen import LoadGenerator
from tests.conftest import REPO, AgentProcess

MODEL = "efficientnet-lite0"  # the tenant an agent without a placement serves


def test_smallest_benchmark_counts_only_inferences(tmp_path: Path) -> None:
    """`python -m bench` with one configuration and a few dozen frames per run: it succeeds, and
    every end-to-end run's results were inferences the agent counted, none from its memory."""
    out = tmp_path / "out"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--backends", "onnxruntime", "--instances", "1"),
            *("--batch", "1", "--seconds", "0.3", "--latency-seconds", "0.3", "--no-plot"),
            *("--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["agent_counters"]
    # The throughput run and the latency run (unloaded, then 70% load) of the one configuration.
    assert [r["run"] for r in runs] == ["e2e onnxruntime x1 b1", "latency onnxruntime x1 b1"]
    for r in runs:
        assert r["results"] > 0
        assert r["inferences"] == r["results"]
        assert r["duplicates"] == 0
    assert "0 answered from the duplicate memory" in run.stdout
    # The figure: the fastest end-to-end configuration against the fastest raw one.
    assert summary["best_e2e_vs_best_raw"] == summary["best_e2e"]["fps"] / summary["best_raw"]["fps"]
    assert "best end to end / best raw" in run.stdout


def test_path_profile_accounts_each_threads_cpu_per_frame(tmp_path: Path) -> None:
    """`python -m bench.path_profile`, one short round: raw and end to end side by side, each of
    the agent's threads with its CPU and wake-ups per frame, the round checked against the agent's
    counters (the run fails otherwise)."""
    out = tmp_path / "path.json"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "bench.path_profile", "--backend", "onnxruntime", "--configs", "1x1"),
            *("--rounds", "1", "--seconds", "0.5", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    [row] = json.loads(out.read_text())
    assert row["frames"] > 0 and row["raw_fps"] > 0 and row["e2e_fps"] > 0
    threads = row["threads"]
    # The frame's path by thread: the event loop received and answered, the tenant's worker ran it.
    assert threads["event loop (MainThread)"]["cpu_ms"] > 0
    assert threads["tenant worker (decode, preprocess, infer call, answer)"]["cpu_ms"] > 0


@pytest.fixture
def bench_agent(agent_factory: Callable[..., AgentProcess], broker: LocalBroker) -> Iterator[AgentCounters]:
    """An agent serving its default tenant, telemetry once a second, and a subscription to it."""
    agent = agent_factory("bench1", TELEMETRY_CONFIG).start()
    agent.wait_ready()
    counters = AgentCounters(broker.url, "bench1")
    yield counters
    counters.close()


def two_runs(broker: LocalBroker, counters: AgentCounters) -> None:
    """Two closed-loop runs on one camera connection, each checked against the agent's counters."""
    frames = jpeg_frames()
    camera = LoadGenerator("127.0.0.1", broker.port, "bench1")
    try:
        for label in ("first run", "second run"):
            before = counters.read()
            _, tally = camera.closed_loop(frames, 2, 0.3, 0.0)
            checked = check(before, counters.read(), {MODEL: tally.results}, label)
            assert checked[0]["inferences"] == tally.results > 0
    finally:
        camera.close()


def test_runs_on_one_connection_are_all_run(broker: LocalBroker, bench_agent: AgentCounters) -> None:
    """Ids are new in each run: the second run is inference too, not answers from memory."""
    two_runs(broker, bench_agent)


def test_the_check_fails_when_answers_came_from_memory(
    broker: LocalBroker, bench_agent: AgentCounters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ids of the first run sent again (as the benchmarks did): the agent answers them from
    its duplicate memory and the check refuses the run."""
    monkeypatch.setattr(loadgen, "run_prefix", lambda name: name)
    with pytest.raises(CountMismatch, match=r"second run: .*answered from the duplicate memory"):
        two_runs(broker, bench_agent)

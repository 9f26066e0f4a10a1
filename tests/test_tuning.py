"""The `auto_tune` rule (agent/placement/tuning.py) on synthetic latency tables, and its profile cache."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from agent.placement.profiler import Profiler
from agent.placement.tuning import Config, configs, fps, latency, slowdown, tune
from agent.protocol.editing import _same_tenant
from agent.protocol.schemas import AutoChoice, TenantSpec, TenantStatus
from agent.service.model_repo import ModelRepository

MODELS = Path(__file__).resolve().parents[1] / "models"


def table(rows: dict[tuple[int, int], dict[int, float]]) -> dict[Config, float]:
    """{(instances, threads): {batch: ms}} -> the tuning table."""
    return {Config(n, t, b): ms for (n, t), sizes in rows.items() for b, ms in sizes.items()}


# A classifier on 2 cores: batches amortise (8 frames in 40 ms, 1 in 8 ms); two instances of one
# thread serve more per second than one of two threads, each batch a little slower.
CLASSIFIER = table(
    {
        (1, 2): {1: 6.0, 2: 11.0, 4: 20.0, 8: 38.0},
        (1, 1): {1: 8.0, 2: 13.0, 4: 24.0, 8: 40.0},
        (2, 1): {1: 9.0, 2: 16.0, 4: 31.0, 8: 60.0},
    }
)
# A detector whose graph takes batch 1 only.
DETECTOR = table({(1, 2): {1: 32.0}, (1, 1): {1: 35.0}, (2, 1): {1: 58.0}})


@pytest.mark.parametrize(
    ("rows", "objective", "delay", "share", "picked"),
    [
        # On an accelerator (no cores given) tenants sharing it take turns.
        # Without an objective: the most frames per second (2 x 8 frames per 60 ms = 267/s).
        (CLASSIFIER, None, 0.0, 1, Config(2, 1, 8)),
        # 150 ms: 2 x 60 = 120 ms fits, the same as throughput-first.
        (CLASSIFIER, 150.0, 0.0, 1, Config(2, 1, 8)),
        # 50 ms: x2 b8 (120 ms) and x2 b4 (62 ms) miss; x2 b2 (32 ms, 250/s) is the most that fits.
        (CLASSIFIER, 50.0, 0.0, 1, Config(2, 1, 2)),
        # The batch delay is part of every frame's wait: 20 ms more leaves x2 b1 (18 + 20 ms, 222/s).
        (CLASSIFIER, 50.0, 20.0, 1, Config(2, 1, 1)),
        # Shared with another tenant every batch takes twice as long: x2 b1 (36 ms, 111/s).
        (CLASSIFIER, 50.0, 0.0, 2, Config(2, 1, 1)),
        # ... and at 30 ms only one instance with both threads answers in time (24 ms, 83/s).
        (CLASSIFIER, 30.0, 0.0, 2, Config(1, 2, 1)),
        (DETECTOR, None, 0.0, 1, Config(2, 1, 1)),
        # On 2 host cores beside another tenant: one core each, so two instances or two threads
        # run at half speed; one instance of one thread at batch 8 serves most (200/s) ...
        (CLASSIFIER, None, 0.0, (2, 2), Config(1, 1, 8)),
        # ... and at 50 ms batch 4 (48 ms, 167/s), where two instances would answer in 36 ms at 111/s.
        (CLASSIFIER, 50.0, 0.0, (2, 2), Config(1, 1, 4)),
        # 100 ms: two instances answer in ~116 ms; one with both threads in ~64 ms.
        (DETECTOR, 100.0, 0.0, 1, Config(1, 2, 1)),
    ],
)
def test_tune_picks_the_most_answers_within_the_objective(rows, objective, delay, share, picked):
    share, cores = share if isinstance(share, tuple) else (share, None)
    best = tune(rows, objective, delay, share, cores)
    assert best is not None and best.config == picked
    slow = {c: slowdown(c, share, cores) for c in rows}
    assert best.goodput == pytest.approx(fps(picked, rows[picked], slow[picked]))
    if objective is not None:
        assert latency(rows[picked], delay, slow[picked]) <= objective
        # Nothing that fits serves more.
        assert all(
            fps(c, ms, slow[c]) <= best.goodput
            for c, ms in rows.items()
            if latency(ms, delay, slow[c]) <= objective
        )


def test_tune_without_a_fitting_configuration_keeps_the_quickest_and_says_so():
    best = tune(DETECTOR, 30.0)
    assert best is not None
    assert best.config == Config(1, 2, 1) and best.goodput == 0.0
    assert "no configuration answers within 30 ms" in best.reason
    assert tune({}, 50.0) is None


def test_the_reason_names_what_the_objective_costs():
    best = tune(CLASSIFIER, 50.0)
    assert best is not None
    assert "most answers within 50 ms" in best.reason and "x2 t1 b8" in best.reason


@pytest.mark.parametrize(
    ("cores", "most", "shapes"),
    [
        (1, 1, [(1, 1)]),
        (1, 2, [(1, 1), (2, 1)]),
        (2, 2, [(1, 1), (1, 2), (2, 1)]),
        (4, 2, [(1, 1), (1, 4), (2, 1), (2, 2)]),
    ],
)
def test_configs_split_the_tenants_cores(cores, most, shapes):
    assert configs(cores, most) == shapes


def test_a_tuned_tenant_is_the_one_status_shows_with_its_tuned_instances():
    asked = TenantSpec(model="m", backend="auto", auto_tune=True)
    choice = AutoChoice(backend="openvino", device="CPU", reason="r", candidates={})
    running = TenantStatus(
        model="m", backend="openvino", device="CPU", instances=2, state="ready", auto=choice
    )
    assert _same_tenant(asked, running)
    assert not _same_tenant(asked.model_copy(update={"auto_tune": False}), running)
    # Additive on the wire: a placement without the field parses as before.
    assert TenantSpec.model_validate({"model": "m"}).auto_tune is False


def test_the_latency_table_is_measured_once_and_a_batch_one_graph_stays_at_batch_one(tmp_path):
    """Real runtime, real SQLite: an old cache (profiles only) gains the table; a detector whose
    graph takes batch 1 only is profiled at batch 1; the second call reads the cache."""
    db = tmp_path / "profiles.db"
    with sqlite3.connect(db) as conn:  # a cache written before auto_tune
        conn.execute(
            "CREATE TABLE profiles (sha256 TEXT, backend TEXT, device TEXT, instances INTEGER, "
            "fps REAL, measured_at REAL, PRIMARY KEY (sha256, backend, device, instances))"
        )
        conn.execute("INSERT INTO profiles VALUES ('x', 'onnxruntime', 'cpu', 1, 99.0, 0)")
    repo = ModelRepository(MODELS)
    profiler = Profiler(db, seconds=0.2)
    classifier = profiler.measure_table(repo.load("efficientnet-lite0", True), "onnxruntime", "cpu", [(1, 1)])
    assert sorted(c.batch for c in classifier) == [1, 2, 4, 8]
    assert all(ms > 0 for ms in classifier.values())
    detector = repo.load("mb3-centernet", True)
    assert list(profiler.measure_table(detector, "onnxruntime", "cpu", [(1, 1)])) == [Config(1, 1, 1)]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT fps FROM profiles WHERE sha256='x'").fetchone() == (99.0,)
        conn.execute("UPDATE batch_profiles SET ms = 1234.0 WHERE batch = 1")
    again = profiler.measure_table(detector, "onnxruntime", "cpu", [(1, 1)])
    assert again == {Config(1, 1, 1): 1234.0}  # from the cache, not measured again


def test_auto_tune_places_what_the_table_says_and_explains_it(tmp_path):
    """Real runtimes: two auto_tune tenants on this machine's CPU are given the instances, threads
    and batch limit their measured tables give, and status's `auto` says which and why."""
    from agent.placement.auto import AutoPlacer, host_cores, resource_of
    from agent.protocol.schemas import Placement

    async def call(fn, what):
        return await asyncio.to_thread(fn)

    placer = AutoPlacer(ModelRepository(MODELS), Profiler(tmp_path / "profiles.db", seconds=0.1), call)
    asked = Placement(
        tenants=[
            TenantSpec(model="efficientnet-lite0", backend="auto", auto_tune=True, latency_objective_ms=500),
            TenantSpec(model="mb3-centernet", backend="auto", auto_tune=True),
        ]
    )
    resolved, choices = asyncio.run(placer.resolve(asked))
    for spec in resolved.tenants:
        choice = choices[spec.model]
        tuned = choice.tuned
        assert tuned is not None, choice
        assert (spec.backend, spec.device) == (choice.backend, choice.device)
        assert (spec.instances, spec.threads, spec.batch.max_size) == (
            tuned.instances,
            tuned.threads,
            tuned.batch_max_size,
        )
        assert resource_of(spec.backend, spec.device) == "cpu"
        # The pick is the rule's on the table status shows (both tenants share the CPU).
        rows = {Config(*(int(p[1:]) for p in label.split())): ms for label, ms in tuned.table.items()}
        best = tune(rows, spec.latency_objective_ms, spec.batch.max_delay_ms, 2, host_cores())
        assert best is not None and best.config == Config(
            tuned.instances, tuned.threads, tuned.batch_max_size
        )
        assert f"x{tuned.instances} t{tuned.threads} b{tuned.batch_max_size}" in choice.reason
    detector = next(t for t in resolved.tenants if t.model == "mb3-centernet")
    assert detector.batch.max_size == 1  # its graph takes batch 1 only

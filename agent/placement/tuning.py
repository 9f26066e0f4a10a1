"""Tuning an auto tenant, pure: which instances, threads and batch limit serve the most answers on time.

The profiler measures a small latency table per candidate (agent/placement/profiler.py
`measure_table`): the time of one batch at each batch size the model takes (1, 2, 4, 8), for
each instances x threads configuration the cores allow. From it, for one tenant:

- without a latency objective: the configuration with the most frames per second;
- with `latency_objective_ms`: the configuration with the most frames per second *within the
  objective* (goodput). A frame in a full batch waits for the batch delay, for the batch ahead of
  it on its instance (one batch of queueing) and for its own batch: `delay + 2 x batch time` must
  fit the objective, or the configuration's goodput is 0. Larger batches and more instances serve
  more per second, but each frame waits longer, so the answer differs from the throughput one.

On a resource shared with other tenants each batch takes longer, so the times are scaled before the
check (`slowdown`): an accelerator is taken in turns (`share` times slower); on the host CPU each
tenant has its share of the cores, and only a configuration running more threads than that share
is slowed, by the excess (the table was measured alone, with every core free). Nothing here
measures, reads a clock or a file: the rules are table-driven unit tests (tests/test_tuning.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BATCH_SIZES = (1, 2, 4, 8)
# Batches queued ahead of a frame's own in the latency estimate: one (the batch in progress).
QUEUED_AHEAD = 1


@dataclass(frozen=True, order=True)
class Config:
    """One way to run a tenant: parallel instances, runtime threads per instance, largest batch."""

    instances: int
    threads: int
    batch: int

    @property
    def label(self) -> str:
        return f"x{self.instances} t{self.threads} b{self.batch}"


# Config -> ms for one batch of `batch` frames on one instance, measured while every instance ran.
LatencyTable = Mapping[Config, float]


@dataclass(frozen=True)
class Tuned:
    config: Config
    fps: float  # frames per second of the configuration (scaled by the share)
    goodput: float  # frames per second within the objective (fps without one)
    latency_ms: float  # the estimate the objective was checked against
    reason: str


def configs(cores: int, max_instances: int = 2) -> list[tuple[int, int]]:
    """(instances, threads per instance) worth measuring for a tenant given `cores`: 1 to
    `max_instances` instances, with one thread each or the tenant's cores split between them."""
    out: set[tuple[int, int]] = set()
    for n in range(1, max(1, max_instances) + 1):
        for t in {1, max(1, cores // n)}:
            out.add((n, t))
    return sorted(out)


def slowdown(config: Config, share: int = 1, cores: int | None = None) -> float:
    """How much slower a batch runs beside `share - 1` other tenants than in the table: `cores`
    None (an accelerator) taken in turns; on `cores` host cores, the threads beyond the tenant's
    share of them."""
    if cores is None:
        return float(max(1, share))
    return max(1.0, config.instances * config.threads * max(1, share) / max(1, cores))


def fps(config: Config, ms: float, slow: float = 1.0) -> float:
    """Frames per second: every instance serves a full batch per batch time (`slow` times longer)."""
    if ms <= 0:
        return 0.0
    return config.instances * config.batch * 1000.0 / (ms * max(1.0, slow))


def latency(ms: float, delay_ms: float, slow: float = 1.0) -> float:
    """Worst expected arrival-to-answer time of a frame in a full batch: the batch delay, the batch
    ahead of it and its own batch."""
    return delay_ms + (QUEUED_AHEAD + 1) * ms * max(1.0, slow)


def tune(
    table: LatencyTable,
    objective_ms: float | None,
    delay_ms: float = 0.0,
    share: int = 1,
    cores: int | None = None,
) -> Tuned | None:
    """The configuration of `table` with the most goodput (throughput without an objective), for a
    tenant beside `share - 1` others (`slowdown`: on `cores` host cores, or an accelerator).

    Ties go to the lower latency (fewer frames at stake per batch). None for an empty table. When
    no configuration fits the objective, the fastest-answering one, with goodput 0 and the reason.
    """
    rows = [(c, ms) for c, ms in table.items() if ms > 0]
    if not rows:
        return None
    scored = []
    for c, ms in rows:
        slow = slowdown(c, share, cores)
        rate = fps(c, ms, slow)
        wait = latency(ms, delay_ms, slow)
        fits = objective_ms is None or wait <= objective_ms
        scored.append((rate if fits else 0.0, -wait, c, rate))
    good, neg_wait, best, rate = max(scored)
    if objective_ms is None:
        reason = f"most frames per second measured ({rate:.1f}/s at {best.label})"
    elif good > 0:
        fastest = max(scored, key=lambda s: (s[3], s[1]))
        reason = f"most answers within {objective_ms:g} ms ({good:.1f}/s, ~{-neg_wait:.0f} ms per frame)"
        if fastest[2] != best:
            reason += (
                f"; the fastest, {fastest[2].label} at {fastest[3]:.1f}/s, would take "
                f"~{-fastest[1]:.0f} ms per frame"
            )
    else:
        best, neg_wait, rate = _quickest(scored)
        reason = (
            f"no configuration answers within {objective_ms:g} ms (the quickest ~{-neg_wait:.0f} ms): "
            "the quickest kept"
        )
    return Tuned(config=best, fps=rate, goodput=good, latency_ms=-neg_wait, reason=reason)


def _quickest(scored: list[tuple[float, float, Config, float]]) -> tuple[Config, float, float]:
    _, neg_wait, c, rate = max(scored, key=lambda s: (s[1], s[3]))
    return c, neg_wait, rate

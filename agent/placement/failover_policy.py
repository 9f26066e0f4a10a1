"""The failover policy: which candidate next, when to fail back, what a move is called.

Pure: it reads the candidates as placed, where the tenant serves, the health of each accelerator
(keyed by `device_key`, a missing one is healthy) and the clock, and returns a decision. The
failover mover (agent/placement/failover.py) applies it and never re-decides (docs/reliability.md,
"Failover across accelerators").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from agent.frames.health import Health, device_key
from agent.protocol.schemas import Candidate
from agent.service.config import FailoverConfig

MoveKind = Literal["failover", "failback"]


def key(candidate: Candidate) -> str:
    return device_key(candidate.backend, candidate.device)


def health_of(book: Mapping[str, Health], candidate: Candidate) -> Health:
    """The candidate's health; one never seen has been healthy all along."""
    found = book.get(key(candidate))
    return found if found is not None else Health(key(candidate), since=float("-inf"))


def rank(candidates: Sequence[Candidate], candidate: Candidate) -> int:
    """Position in the placed order (0: preferred), by accelerator."""
    keys = [key(c) for c in candidates]
    return keys.index(key(candidate))


def start_order(candidates: Sequence[Candidate], book: Mapping[str, Health]) -> list[Candidate]:
    """Where to load a tenant: in order, healthy ones first (one known hung or failing is tried last)."""
    return sorted(candidates, key=lambda c: not health_of(book, c).healthy)


def next_candidates(
    candidates: Sequence[Candidate], serving: Candidate, book: Mapping[str, Health], stranded: bool
) -> list[Candidate]:
    """Where a tenant moves when it must leave `serving`: the healthy candidates in order, not the
    one it serves on, unless it is stranded (`failed`, its own candidate may take it back loaded
    afresh)."""
    return [c for c in candidates if health_of(book, c).healthy and (stranded or key(c) != key(serving))]


def move_kind(candidates: Sequence[Candidate], source: Candidate, target: Candidate) -> MoveKind:
    """A move to a better-ranked candidate is a failback, any other a failover."""
    return "failback" if rank(candidates, target) < rank(candidates, source) else "failover"


def failback_hold_s(health: Health, failover: FailoverConfig) -> float:
    """How long a better candidate must stay healthy before it takes the tenant back: doubled per
    failure in a row like the probe interval (a flapping device is not taken back at once)."""
    return health.backoff(failover.failback_after_s, failover.backoff_max_s)


def failback_due(health: Health, now: float, failover: FailoverConfig, stranded: bool) -> bool:
    """A healthy candidate takes the tenant back after the hold; at once when the tenant is stranded."""
    return health.healthy and (stranded or now - health.since >= failback_hold_s(health, failover))


@dataclass(frozen=True)
class Step:
    """One thing the health check does for a tenant, in order: probe a candidate, or move to it."""

    action: Literal["probe", "move"]
    candidate: Candidate
    reason: str = ""


@dataclass(frozen=True)
class Check:
    """The health check's decision for one serving tenant (see `check`)."""

    forget_failures: bool = False  # the preferred candidate serves steadily: its backoff starts over
    leave: list[Candidate] | None = None  # its accelerator is failing: move to the first that loads
    leave_reason: str = ""
    steps: list[Step] = field(default_factory=list)  # else: until the first move that succeeds


def check(
    candidates: Sequence[Candidate],
    serving: Candidate,
    stranded: bool,
    handing_off: bool,
    book: Mapping[str, Health],
    now: float,
    failover: FailoverConfig,
) -> Check:
    """What the once-a-second health check does for a tenant serving on `serving`.

    Stranded (`failed`, no candidate could take it): probe any candidate due and move to any that is
    healthy. Otherwise: leave an accelerator another tenant found hung or failing (make-before-break);
    else probe the better-ranked candidates that are due and move back to one healthy for its hold.
    """
    here = health_of(book, serving)
    here_rank = rank(candidates, serving)
    forget = (
        not stranded and here_rank == 0 and here.failures > 0 and now - here.since > failover.backoff_max_s
    )
    if not stranded and here.device_fault and not handing_off:
        return Check(
            forget_failures=forget,
            leave=next_candidates(candidates, serving, book, stranded=False),
            leave_reason=f"{serving.label} unhealthy ({here.reason})",
        )
    steps = []
    for candidate in candidates:
        if not stranded and rank(candidates, candidate) >= here_rank:
            continue
        health = health_of(book, candidate)
        if health.due(now):
            steps.append(Step("probe", candidate))
        if failback_due(health, now, failover, stranded):
            why = "serves again" if stranded else "healthy again"
            steps.append(Step("move", candidate, f"{candidate.label} {why}"))
    return Check(forget_failures=forget, steps=steps)

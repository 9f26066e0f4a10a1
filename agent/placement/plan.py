"""Placement plan, pure: from what runs and what is asked, which tenants start, stay and retire,
and what is saved for the next start. The reconciler carries the plan out (docs/protocol.md,
"Placement": make-before-break; a failed start leaves the old tenant serving).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.protocol.schemas import Placement, TenantSpec, generation_refusal
from agent.service.errors import PlacementRefused


@dataclass(frozen=True)
class Plan:
    """Steps in order: start each of `start` (new or changed), then retire `retire`."""

    start: list[TenantSpec] = field(default_factory=list)  # placement order
    keep: list[str] = field(default_factory=list)  # models whose running tenant already matches
    retire: list[str] = field(default_factory=list)  # running models no longer asked for
    forget: list[str] = field(default_factory=list)  # failed entries of models no longer asked for


def check_generation(generation: int, applied: int | None) -> None:
    """Generations only go forward: the one rule, shared with the console (agent.protocol.schemas)."""
    refusal = generation_refusal(generation, applied)
    if refusal is not None:
        raise PlacementRefused(refusal)


def plan(desired: Placement, running: Mapping[str, TenantSpec], failed: frozenset[str] = frozenset()) -> Plan:
    """Compare by each tenant's key (model, backend, device, instances, batch, ...): a tenant whose
    spec changed in any field is started anew and the old one retired once the new one serves."""
    wanted = {spec.model for spec in desired.tenants}
    start, keep = [], []
    for spec in desired.tenants:
        current = running.get(spec.model)
        if current is not None and current.key() == spec.key():
            keep.append(spec.model)
        else:
            start.append(spec)
    return Plan(
        start=start,
        keep=keep,
        retire=[m for m in running if m not in wanted],
        forget=sorted(m for m in failed if m not in wanted),
    )


def to_save(asked: Placement, resolved: Placement, serving: Mapping[str, TenantSpec]) -> Placement:
    """The document saved for the next start: what serves now.

    `asked` is the document as published ("auto" stays auto, re-chosen at start; its signature
    kept), `resolved` the same with auto choices made. A model whose move failed is saved as the
    tenant that kept serving it, so a restart does not turn a working model into a failed one.
    """
    wanted = {spec.model: spec for spec in resolved.tenants}
    saved = []
    for spec in asked.tenants:
        running = serving.get(spec.model)
        failed_move = running is not None and running.key() != wanted[spec.model].key()
        saved.append(running if failed_move and running is not None else spec)
    return asked.model_copy(update={"tenants": saved})

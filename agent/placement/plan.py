"""Placement plan, pure: from what runs and what is asked, which tenants start, stay and retire,
and what is saved for the next start. The reconciler carries the plan out (docs/protocol.md,
"Placement": make-before-break; a failed start leaves the old tenant serving).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.protocol.schemas import Placement, TenantSpec, generation_refusal
from agent.service.errors import PlacementRefused
from agent.service.model_repo import ModelError, ModelRepository

# A model's task ("detection", "classification") and labels, for the cascade checks.
Describe = Callable[[TenantSpec], tuple[str, tuple[str, ...]]]


@dataclass(frozen=True)
class Plan:
    """Steps in order: start each of `start` (new or changed), then retire `retire`."""

    start: list[TenantSpec] = field(default_factory=list)  # placement order
    # By tenant key (`TenantSpec.tenant_key`: the model, or `name@version` when pinned).
    keep: list[str] = field(default_factory=list)  # keys whose running tenant already matches
    retire: list[str] = field(default_factory=list)  # running keys no longer asked for
    forget: list[str] = field(default_factory=list)  # failed entries of keys no longer asked for


def check_generation(generation: int, applied: int | None) -> None:
    """Generations only go forward: the one rule, shared with the console (agent.protocol.schemas)."""
    refusal = generation_refusal(generation, applied)
    if refusal is not None:
        raise PlacementRefused(refusal)


def plan(desired: Placement, running: Mapping[str, TenantSpec], failed: frozenset[str] = frozenset()) -> Plan:
    """Compare by each tenant's key (model, backend, device, instances, batch, ...): a tenant whose
    spec changed in any field is started anew and the old one retired once the new one serves."""
    wanted = {spec.tenant_key() for spec in desired.tenants}
    start, keep = [], []
    for spec in desired.tenants:
        current = running.get(spec.tenant_key())
        if current is not None and current.key() == spec.key():
            keep.append(spec.tenant_key())
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
    wanted = {spec.tenant_key(): spec for spec in resolved.tenants}
    saved = []
    for spec in asked.tenants:
        running = serving.get(spec.tenant_key())
        failed_move = running is not None and running.key() != wanted[spec.tenant_key()].key()
        saved.append(running if failed_move and running is not None else spec)
    return asked.model_copy(update={"tenants": saved})


def check_cascades(placement: Placement, describe: Describe) -> None:
    """Refuse a cascade that cannot run (docs/detection.md "Cascades"): it follows a tenant the
    placement lacks, the follows form a cycle, the follower is not a classifier or the followed
    tenant not a detector, it names a label the detector does not have, or a second classifier
    follows the same detector."""
    specs = {spec.tenant_key(): spec for spec in placement.tenants}
    followed: dict[str, str] = {}
    for spec in placement.tenants:
        cascade = spec.cascade
        if cascade is None:
            continue
        if cascade.after not in specs:
            raise PlacementRefused(
                f"cascade: {spec.tenant_key()} follows {cascade.after!r}, which this placement does not run"
            )
        chain = [spec.tenant_key()]
        step: TenantSpec | None = spec
        while step is not None and step.cascade is not None:
            chain.append(step.cascade.after)
            if step.cascade.after in chain[:-1]:
                raise PlacementRefused(f"cascade: a cycle, {' -> '.join(chain)}")
            step = specs.get(step.cascade.after)
        if cascade.after in followed:
            raise PlacementRefused(
                f"cascade: {followed[cascade.after]} and {spec.tenant_key()} both follow {cascade.after}; "
                "one classifier per detector"
            )
        followed[cascade.after] = spec.tenant_key()
        task, _ = describe(spec)
        if task != "classification":
            raise PlacementRefused(
                f"cascade: {spec.tenant_key()} is a {task} model; a cascade runs a classifier"
            )
        detector_task, labels = describe(specs[cascade.after])
        if detector_task != "detection":
            raise PlacementRefused(
                f"cascade: {spec.tenant_key()} follows {cascade.after}, a {detector_task} model; "
                "a cascade follows a detector"
            )
        known = {label.lower() for label in labels}
        unknown = [label for label in cascade.labels or [] if label.lower() not in known]
        if unknown:
            raise PlacementRefused(
                f"cascade: labels {unknown} of {spec.tenant_key()} are not classes of the detector "
                f"{cascade.after} (e.g. {', '.join(labels[:5])})"
            )


def describe_with(repo: ModelRepository) -> Describe:
    """`describe` from the model repository (blocking file reads: call from a worker thread)."""

    def describe(spec: TenantSpec) -> tuple[str, tuple[str, ...]]:
        try:
            model = repo.load(spec.model, verify=False, version=spec.version)
        except ModelError as exc:
            raise PlacementRefused(str(exc)) from exc
        return model.manifest.task, model.labels

    return describe

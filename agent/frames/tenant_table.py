"""The tenant table: the one owner of what this device serves and why.

Serving, failed (or still loading) and draining tenants, the placement generations and the device's
capabilities. Only the reconciler changes tenants (through these methods); the router and the
reporting read. Every change sets `changed`, which the status loop publishes. Event-loop only.

Tenants are keyed by `TenantSpec.tenant_key()`: the model name, or `name@version` for a pinned
tenant, so two versions of one model serve side by side. `resolve` says which tenant a frame's
`model` reaches (docs/protocol.md "Two versions side by side").
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from typing import Any

from agent.frames.tenant import Tenant
from agent.protocol.schemas import (
    AutoChoice,
    Candidate,
    Capabilities,
    CascadeSpec,
    Failover,
    Refusal,
    TenantSpec,
    TenantStatus,
)
from agent.protocol.topics import split_key
from agent.service.model_repo import version_key


class TenantTable:
    def __init__(self) -> None:
        self._serving: dict[str, Tenant] = {}  # tenant key -> the tenant serving it now
        self._failed: dict[str, TenantStatus] = {}  # key -> loading, or why its tenant could not start
        self._draining: list[Tenant] = []
        self.capabilities = Capabilities()
        self.generation: int | None = None  # the newest placement accepted for applying
        self.applied_generation: int | None = None
        self.applied_signature: str | None = None  # its retained copy, redelivered, is not a replay
        self.refused: Refusal | None = None
        self.auto_choices: dict[str, AutoChoice] = {}  # model -> why auto placed it there
        self.changed = asyncio.Event()
        # Moves between candidates, per tenant key: the recent ones (status) and how many (telemetry).
        self._failovers: dict[str, deque[Failover]] = {}
        self.failover_counts: Counter[str] = Counter()

    # -- reads (router, reporting) ----------------------------------------------------------------
    def get(self, model: str) -> Tenant | None:
        """The tenant a frame's `model` reaches (`resolve`), or None. Worker threads call it too."""
        tenant = self._serving.get(model)  # the usual case: a plain lookup
        if tenant is not None:
            return tenant
        key = self.resolve(model)
        return None if key is None else self._serving.get(key)

    def resolve(self, model: str) -> str | None:
        """The serving tenant key a frame's `model` reaches: the tenant of that key; for
        `name@version`, else the tenant serving that version; for `name`, else the model's oldest
        pinned tenant (an unpinned one is keyed `name`). None when none serves it.

        Oldest, not newest: a version added beside the one that serves takes only the frames that
        name it, until the operator places it alone (a staged switch, docs/fleet.md)."""
        serving = list(self._serving.items())  # one step: the loop may change the table meanwhile
        return resolve_key(model, {key: t.model.manifest.version for key, t in serving})

    def unavailable_reason(self, model: str) -> str | None:
        """Why a placed model serves nothing right now (loading, failed), or None if unknown here."""
        key = resolve_key(model, {k: entry.version for k, entry in list(self._failed.items())})
        entry = None if key is None else self._failed.get(key)
        if entry is None:
            return None
        return "is still loading" if entry.state == "loading" else f"failed to load: {entry.error}"

    def follower(self, model: str) -> tuple[str, CascadeSpec] | None:
        """The classifier placed to run on `model`'s boxes, and how (docs/detection.md "Cascades"):
        serving, or placed but not serving (its frames' boxes then go out marked unavailable).
        `model` is a frame's; `after` names the detector tenant's key."""
        key = model if model in self._serving else (self.resolve(model) or model)  # per frame: cheap
        for spec in [*(t.placed for t in list(self._serving.values())), *list(self._failed.values())]:
            if spec.cascade is not None and spec.cascade.after == key:
                return spec.tenant_key(), spec.cascade
        return None

    def served_models(self) -> list[str]:
        """The keys of the serving tenants."""
        return sorted(self._serving)

    def serving(self) -> list[Tenant]:
        return list(self._serving.values())

    def serving_specs(self) -> dict[str, TenantSpec]:
        """The placement entries that serve (as placed: a failed-over tenant is still its entry)."""
        return {key: t.placed for key, t in self._serving.items()}

    def failovers(self, key: str) -> list[Failover]:
        return list(self._failovers.get(key, ()))

    def failed_models(self) -> frozenset[str]:
        return frozenset(self._failed)

    def draining(self) -> list[Tenant]:
        return list(self._draining)

    def live(self) -> list[Tenant]:
        """Every tenant with threads: serving and draining (stall checks, shutdown drain)."""
        return [*self._serving.values(), *self._draining]

    def statuses(self) -> list[TenantStatus]:
        """The `placement.tenants` list of status (docs/protocol.md)."""

        def spec(t: Tenant) -> dict[str, Any]:
            # backend/device: where it serves (the canonical device name), candidates as placed.
            out = {**t.placed.model_dump(), "backend": t.spec.backend, "device": t.device}
            out.update(address=t.spec.tenant_key(), serving_version=t.model.manifest.version)
            if t.placed.candidates:
                history = self.failovers(t.spec.tenant_key())
                out["serving"] = Candidate(backend=t.spec.backend, device=t.device)
                out["last_failover"] = history[-1] if history else None
                out["failovers"] = history
            return out

        out = [
            TenantStatus(
                **spec(t),
                state=t.state,
                error=t.error,
                auto=self.auto_choices.get(t.spec.tenant_key(), self.auto_choices.get(t.spec.model)),
            )
            for t in self._serving.values()
        ]
        out += [TenantStatus(**spec(t), state="draining") for t in self._draining]
        out += list(self._failed.values())
        return out

    # -- changes (reconciler, daemon) ---------------------------------------------------------------
    def touch(self) -> None:
        """Something status shows changed: publish it."""
        self.changed.set()

    def loading(self, spec: TenantSpec) -> None:
        key = spec.tenant_key()
        self._failed[key] = TenantStatus(**spec.model_dump(), address=key, state="loading")
        self.touch()

    def failed(self, spec: TenantSpec, error: str) -> None:
        key = spec.tenant_key()
        self._failed[key] = TenantStatus(**spec.model_dump(), address=key, state="failed", error=error)
        self.touch()

    def clear_failed(self, key: str) -> None:
        if self._failed.pop(key, None) is not None:
            self.touch()

    def install(self, tenant: Tenant) -> Tenant | None:
        """`tenant` serves its key from now on; returns the tenant it replaces (to retire)."""
        key = tenant.spec.tenant_key()
        old = self._serving.get(key)
        self._serving[key] = tenant  # new frames go to the new tenant from here on
        self._failed.pop(key, None)
        self.touch()
        return old

    def record_failover(self, key: str, move: Failover) -> None:
        """Tenant `key` moved between candidates (status keeps the last 10, telemetry counts them)."""
        self._failovers.setdefault(key, deque(maxlen=10)).append(move)
        self.failover_counts[key] += 1
        self.touch()

    def remove(self, key: str) -> Tenant | None:
        tenant = self._serving.pop(key, None)
        self.touch()
        return tenant

    def start_draining(self, tenant: Tenant) -> None:
        self._draining.append(tenant)
        self.touch()

    def drained(self, tenant: Tenant) -> bool:
        """`tenant` finished draining; True when no tenant drains any more."""
        if tenant in self._draining:
            self._draining.remove(tenant)
        self.touch()
        return not self._draining

    def set_capabilities(self, capabilities: Capabilities) -> None:
        self.capabilities = capabilities
        self.touch()

    def accepted(self, generation: int, choices: dict[str, AutoChoice]) -> None:
        """A placement passed every check and is being applied."""
        self.auto_choices = choices
        self.refused = None
        self.generation = generation
        self.touch()

    def applied(self, generation: int, signature: str | None) -> None:
        self.applied_generation = generation
        self.applied_signature = signature
        self.touch()

    def refuse(self, refusal: Refusal) -> None:
        self.refused = refusal
        self.touch()


def resolve_key(model: str, versions: dict[str, str | None]) -> str | None:
    """Of `versions` (tenant key -> the version it serves, if known), the key a frame's `model`
    reaches; see `TenantTable.resolve`."""
    if model in versions:
        return model
    name, version = split_key(model)
    same = [key for key in versions if split_key(key)[0] == name]
    if version is not None:
        return next((key for key in same if versions[key] == version), None)
    pinned = [key for key in same if split_key(key)[1] is not None]
    return min(pinned, key=lambda key: version_key(split_key(key)[1] or ""), default=None)

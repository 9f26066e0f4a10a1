"""The thread budget, pure: tenants sharing the host's CPU cores get a share of runtime threads each.

Runtimes size their thread pools for a machine of their own: OpenVINO takes every core for each
compiled model, so two models side by side on a 2-core device run 4 busy threads on 2 cores, and
together they do no better than taking turns (docs/performance.md "Latency objectives"). With
several tenants on the CPU, a tenant that does not set `threads` gets `cores // instances` of them
per instance (instances of every such tenant counted), at least 1; cores left over go to higher
priority tenants first. Tenants that set `threads` keep them and their threads are taken off first.
A tenant alone on the CPU keeps its backend's own default.

A backend may opt out (`BackendInfo.thread_budget`) while no tenant on the CPU has a latency
objective: OpenVINO does, because two of its models sharing 2 cores with a thread each did worse
than taking turns (multi-tenant gain 0.74 and 0.78 against 0.99 and 0.94 with its own pools). With
an objective the budget applies to every tenant: with their own pools a flooded OpenVINO model
took the other's objective share from 99.9% to 61.2% (docs/performance.md "Latency objectives").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agent.frames.slo_policy import PRIORITIES
from agent.protocol.schemas import TenantSpec

HOST = "cpu"  # the resource name backends give the host CPU (backends/base.py BackendInfo.resource)


def thread_budget(
    tenants: Sequence[TenantSpec],
    cores: int,
    resource_of: Callable[[str, str], str],
    budgeted: Callable[[str], bool] = lambda _backend: True,
) -> dict[str, int]:
    """Threads per instance, by tenant key (`TenantSpec.tenant_key`), for the tenants on the host
    CPU that left `threads` unset, when more than one tenant runs there; {} otherwise. Tenants of a
    backend `budgeted` rejects are left out (neither given threads nor counted) unless a tenant on
    the CPU has a latency objective: isolation then matters more than the runtime's own pools."""
    host = [t for t in tenants if _on_host(t, resource_of)]
    objectives = any(t.latency_objective_ms is not None for t in host)
    on_cpu = [t for t in host if objectives or budgeted(t.backend)]
    if len(on_cpu) < 2:
        return {}
    free = [t for t in on_cpu if t.threads is None]
    if not free:
        return {}
    taken = sum((t.threads or 0) * t.instances for t in on_cpu if t.threads is not None)
    left = max(0, cores - taken)
    instances = sum(t.instances for t in free)
    share = max(1, left // instances)
    spare = max(0, left - share * instances)
    out: dict[str, int] = {}
    for spec in sorted(free, key=lambda t: (PRIORITIES[t.priority], t.tenant_key())):
        extra = spare // spec.instances
        spare -= extra * spec.instances
        out[spec.tenant_key()] = share + extra
    return out


def _on_host(spec: TenantSpec, resource_of: Callable[[str, str], str]) -> bool:
    try:
        return resource_of(spec.backend, spec.device) == HOST
    except Exception:  # an unknown backend or `auto` not resolved yet: not counted on the CPU
        return False


def apply_budget(
    tenants: Sequence[TenantSpec],
    cores: int,
    resource_of: Callable[[str, str], str],
    budgeted: Callable[[str], bool] = lambda _backend: True,
) -> list[TenantSpec]:
    """`tenants` with their budgeted `threads` filled in (the others unchanged)."""
    budget = thread_budget(tenants, cores, resource_of, budgeted)
    return [
        t.model_copy(update={"threads": budget[t.tenant_key()]}) if t.tenant_key() in budget else t
        for t in tenants
    ]

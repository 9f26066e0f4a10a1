"""Starting a tenant: load and warm it up on its first candidate that loads, under deadlines.

Used by placements (the reconciler) and by failovers and failbacks (the failover mover): a load
that fails or times out marks that accelerator unhealthy; one that succeeds is as good as a probe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agent.frames.deadline import call_with_deadline
from agent.frames.health import HealthBook, Relay
from agent.frames.tenant import FailoverSettings, Tenant, TenantOptionError
from agent.frames.tenant_table import TenantTable
from agent.placement.failover_policy import start_order
from agent.protocol.schemas import Candidate, TenantSpec
from agent.service.config import AgentConfig
from agent.service.model_repo import Model, ModelError, ModelRepository
from backends import registry
from backends.base import Backend, BackendError

log = logging.getLogger(__name__)
TenantFactory = Callable[[TenantSpec, Model, Backend], Tenant]
UnhealthyFn = Callable[[Tenant, str, str], Relay | None]


class Starter:
    def __init__(
        self,
        config: AgentConfig,
        table: TenantTable,
        repo: ModelRepository,
        make_tenant: TenantFactory,
        health: HealthBook,
        on_unhealthy: UnhealthyFn,
        note_error: Callable[[str], None],
        extend_start: Callable[[float], None],
    ) -> None:
        self.config = config
        self.table = table
        self.repo = repo
        self.make_tenant = make_tenant
        self.health = health
        self.on_unhealthy = on_unhealthy
        self.note_error = note_error
        self.extend_start = extend_start

    async def start_tenant(self, spec: TenantSpec) -> Tenant | None:
        """Load and warm up a tenant on its first candidate that loads; None (and the tenant shown
        `failed` with why) if none can."""
        self.table.loading(spec)
        errors = []
        candidates = spec.candidate_list()
        for candidate in start_order(candidates, self.health.of(candidates)):
            tenant = await self.start_on(spec, candidate)
            if isinstance(tenant, Tenant):
                return tenant
            errors.append(tenant if len(candidates) == 1 else f"{candidate.label}: {tenant}")
        message = "; ".join(errors)
        self.table.failed(spec, message)
        self.note_error(f"{spec.model} on {spec.backend}:{spec.device}: {message}")
        return None

    async def start_on(self, placed: TenantSpec, candidate: Candidate) -> Tenant | str:
        """A tenant of `placed` loaded on `candidate`, started; else why not (the candidate is
        then unhealthy)."""
        spec = placed.on(candidate)
        try:
            tenant = await self._load(spec)
        except Exception as exc:  # whatever it is, the tenant is `failed` with the reason, not stuck loading
            expected = isinstance(exc, BackendError | ModelError | OSError)
            message = str(exc) if expected else f"{type(exc).__name__}: {exc}"
            if not expected:
                log.exception("tenant %s on %s:%s: unexpected error", spec.model, spec.backend, spec.device)
            log.error("tenant %s on %s:%s failed: %s", spec.model, spec.backend, spec.device, message)
            if placed.candidates and not isinstance(exc, TenantOptionError):
                failover = self.config.failover
                health = self.health[candidate]
                health.fail(f"load failed: {message}", failover.probe_interval_s, failover.backoff_max_s)
            return message
        health = self.health[candidate]
        if not health.healthy:  # it loaded and warmed up: as good as a probe
            health.passed()
        settings = None
        if len(placed.candidate_list()) > 1:
            failover = self.config.failover
            settings = FailoverSettings(
                on_unhealthy=self.on_unhealthy,
                errors_to_fail=failover.errors_to_fail,
                stall_timeout_s=failover.stall_timeout_s,
                drift_factor=failover.drift_factor,
            )
        tenant.placed_as(placed, settings)
        tenant.start()
        log.info("tenant %s ready", tenant.name)
        return tenant

    async def _load(self, spec: TenantSpec) -> Tenant:
        backend = registry.get(spec.backend)
        timeout = self.config.scheduler.load_timeout_s
        self.extend_start(2 * timeout)  # the availability check, then the load
        try:  # asks the runtime and its driver, which can hang on a wedged device
            ok, reason = await call_with_deadline(backend.available, timeout, None)
        except TimeoutError:
            raise BackendError(
                f"backend {spec.backend} did not say whether it is available within {timeout:g} s"
            ) from None
        if not ok:
            raise BackendError(f"backend {spec.backend} unavailable: {reason}")
        model = await asyncio.to_thread(self.repo.load, spec.model, True, spec.version)
        tenant = self.make_tenant(spec, model, backend)
        try:
            await call_with_deadline(
                tenant.load,
                timeout,
                on_late=lambda _: tenant.abandon("it finished loading after the timeout"),
            )
        except TimeoutError:
            raise BackendError(
                f"loading did not finish within {timeout:g} s (the accelerator may be hung); "
                "abandoned, the current placement keeps serving"
            ) from None
        return tenant

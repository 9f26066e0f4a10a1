"""The failover mover: applies the failover policy to tenants with several candidates.

Away from a candidate that turned unhealthy (failover) and back once a better one has been healthy
long enough (failback), under the reconciler's lock, make-before-break, announced through
`publish_event` (docs/reliability.md, "Failover"). Which candidate and when is decided by
agent/placement/failover_policy.py; this module loads, installs, relays, probes and announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from agent.frames import faults
from agent.frames.deadline import call_with_deadline
from agent.frames.health import Health, HealthBook, Relay, probe
from agent.frames.tenant import Tenant
from agent.frames.tenant_table import TenantTable
from agent.placement import failover_policy as policy
from agent.protocol.schemas import Candidate, Failover, FailoverEvent
from agent.service.config import AgentConfig
from backends import registry

log = logging.getLogger(__name__)
StartOn = Callable[[Any, Candidate], Coroutine[Any, Any, "Tenant | str"]]


def serving_candidate(tenant: Tenant) -> Candidate:
    """The candidate a tenant was started on, as placed (its device name as written there)."""
    return Candidate(backend=tenant.spec.backend, device=tenant.spec.device)


class FailoverMover:
    def __init__(
        self,
        config: AgentConfig,
        table: TenantTable,
        lock: asyncio.Lock,
        health: HealthBook,
        start_on: StartOn,
        retire: Callable[[Tenant], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], Any],
        note_error: Callable[[str], None],
        publish_event: Callable[[bytes], None],
        accepting: Callable[[], bool],
    ) -> None:
        self.config = config
        self.table = table
        self._lock = lock  # the reconciler's: one placement or move at a time
        self.health = health
        self._start_on = start_on
        self._retire = retire
        self._spawn = spawn
        self.note_error = note_error
        self._publish_event = publish_event
        self._accepting = accepting
        self._failing: set[str] = set()  # models with a failover under way
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop failovers run on (tenants report from their worker threads)."""
        self._loop = loop

    def _fail(self, health: Health, reason: str, kind: str = "") -> None:
        failover = self.config.failover
        health.fail(reason, failover.probe_interval_s, failover.backoff_max_s, kind=kind)

    # -- failover ---------------------------------------------------------------------------------
    def on_unhealthy(self, tenant: Tenant, kind: str, reason: str) -> Relay | None:
        """A tenant's serving candidate turned unhealthy (any thread). A stall or errors: its frames
        are held in a relay until the next candidate serves; a drift: it serves on meanwhile."""
        loop = self._loop
        if loop is None or not self._accepting():
            return None
        noticed = tenant.fault_since if kind != "drift" and tenant.fault_since else time.monotonic()
        relay = None if kind == "drift" else Relay(tenant.reject, self.config.scheduler.queue_depth)
        self._failing.add(tenant.placed.tenant_key())
        loop.call_soon_threadsafe(
            lambda: self._spawn(
                self._fail_over(tenant, kind, reason, relay, noticed), f"failover-{tenant.name}"
            )
        )
        return relay

    async def _fail_over(
        self, tenant: Tenant, kind: str, reason: str, relay: Relay | None, noticed: float
    ) -> None:
        try:
            await self._fail_over_now(tenant, kind, reason, relay, noticed)
        except asyncio.CancelledError:  # the agent is stopping: what the relay holds is answered
            if relay is not None:
                relay.fail("the agent stopped while this frame moved to another candidate", "shutting_down")
            raise
        finally:
            self._failing.discard(tenant.placed.tenant_key())

    async def _fail_over_now(
        self, tenant: Tenant, kind: str, reason: str, relay: Relay | None, noticed: float
    ) -> None:
        placed, here = tenant.placed, serving_candidate(tenant)
        self._fail(self.health[here], f"{kind}: {reason}", kind=kind)
        log.error("tenant %s: %s on %s (%s); failing over", placed.tenant_key(), kind, here.label, reason)
        async with self._lock:
            current = self.table.get(placed.tenant_key())
            if current is not tenant:  # a placement or a failback replaced it meanwhile
                if relay is not None:
                    relay.connect(current) if current is not None else relay.fail("the tenant was removed")
                return
            targets = policy.next_candidates(
                placed.candidate_list(),
                here,
                self.health.of(placed.candidate_list()),
                stranded=tenant.state == "failed",
            )
            moved = await self._move(tenant, targets, f"{kind}: {reason}", relay, noticed)
        if not moved:
            message = f"no other candidate could serve {placed.tenant_key()} after a {kind} on {here.label}"
            if relay is not None:
                relay.fail(message)
            self.note_error(message)

    async def _move(
        self, tenant: Tenant, targets: list[Candidate], reason: str, relay: Relay | None, noticed: float
    ) -> bool:
        """Load the first of `targets` (chosen by the policy) that loads, install it, hand it the
        relay's frames, retire `tenant` (it drains what it holds), announce. Under the lock; False
        when none loaded (`tenant` stays)."""
        for candidate in targets:
            new = await self._start_on(tenant.placed, candidate)
            if not isinstance(new, Tenant):
                continue
            self.table.install(new)
            if relay is not None:
                relay.connect(new)
            self._retire(tenant)
            self._announce(tenant, new, reason, noticed)
            return True
        return False

    def _announce(self, old: Tenant, new: Tenant, reason: str, began: float) -> None:
        """Status (last failover, history), telemetry (count), edge/<id>/events, the log. `began`:
        when the fault began (the hung call, the first error in a row), as far as the agent knows."""
        kind = policy.move_kind(old.placed.candidate_list(), serving_candidate(old), serving_candidate(new))
        move = Failover.model_validate(
            {
                "kind": kind,
                "from": f"{old.spec.backend}:{old.device}",
                "to": f"{new.spec.backend}:{new.device}",
                "reason": reason,
                "recovery_s": None if kind == "failback" else round(time.monotonic() - began, 3),
            }
        )
        self.table.record_failover(new.placed.tenant_key(), move)
        log.warning(
            "tenant %s: %s from %s to %s (%s)%s",
            new.placed.tenant_key(),
            move.kind,
            move.source,
            move.to,
            reason,
            "" if move.recovery_s is None else f", serving again {move.recovery_s:.2f} s after the fault",
        )
        event = FailoverEvent(
            **move.model_dump(), device_id=self.config.device_id, model=new.placed.tenant_key()
        )
        self._publish_event(event.model_dump_json().encode())

    # -- health checks, probes, failback ----------------------------------------------------------
    async def health_loop(self) -> None:
        """Once a second: probe unhealthy candidates that are due (backoff), and move tenants back
        to a better candidate healthy for long enough (or to any that serves, when theirs failed)."""
        while True:
            await asyncio.sleep(1.0)
            if not self._accepting():
                continue  # stopping: nothing moves any more
            try:
                await self.check_health()
            except Exception:  # a bug here must not stop the agent
                log.exception("health check failed")

    async def check_health(self) -> None:
        now = time.monotonic()
        for tenant in self.table.serving():
            placed = tenant.placed
            candidates = placed.candidate_list()
            if len(candidates) < 2 or placed.tenant_key() in self._failing:
                continue
            here = serving_candidate(tenant)
            decision = policy.check(
                candidates,
                here,
                stranded=tenant.state == "failed",
                handing_off=tenant.handing_off,
                book=self.health.of(candidates),
                now=now,
                failover=self.config.failover,
            )
            if decision.forget_failures:
                self.health[here].forget_failures()
            if decision.leave is not None:
                # Another tenant found this accelerator hung or failing: move before it meets it too.
                async with self._lock:
                    if self.table.get(placed.tenant_key()) is tenant:
                        await self._move(
                            tenant, decision.leave, decision.leave_reason, None, time.monotonic()
                        )
                continue
            for step in decision.steps:
                if step.action == "probe":
                    health = self.health[step.candidate]
                    health.probe_started()  # in the background: a hung probe holds no other check
                    self._spawn(self._probe(tenant, step.candidate, health), f"probe-{step.candidate.label}")
                    continue
                async with self._lock:
                    if self.table.get(placed.tenant_key()) is not tenant:
                        break
                    if await self._move(tenant, [step.candidate], step.reason, None, now):
                        break

    async def _probe(self, tenant: Tenant, candidate: Candidate, health: Health) -> None:
        """One inference of the tenant's model on the idle candidate, under the inference deadline."""
        health.probe_started()
        loop = asyncio.get_running_loop()

        def run() -> float:  # off the loop: finding the device may scan buses or ask a driver
            try:
                backend = registry.get(candidate.backend)
                device = backend.canonical_device(candidate.device)
                placed = tenant.placed
                options = {"threads": placed.threads, "precision": placed.precision}
                fault = faults.active().find(candidate.backend, device)
                return probe(backend, tenant.model.artifacts, device, fault, options)
            finally:
                # Only when the call has really returned: a probe stuck in a hung device must not
                # be followed by another one at each backoff (a thread and a session each).
                with contextlib.suppress(RuntimeError):  # the loop is gone: the agent stopped
                    loop.call_soon_threadsafe(health.probe_finished)

        try:
            timeout = self.config.scheduler.infer_timeout_s + self.config.scheduler.load_timeout_s
            ms = await call_with_deadline(run, timeout, None)
        except Exception as exc:  # a hang (TimeoutError), a load failure, a runtime error
            reason = "probe did not return" if isinstance(exc, TimeoutError) else f"probe failed: {exc}"
            self._fail(health, reason)
            log.warning("candidate %s of %s: %s", candidate.label, tenant.placed.tenant_key(), reason)
        else:
            health.passed()
            log.warning(
                "candidate %s of %s: probe passed (%.1f ms)", candidate.label, tenant.placed.tenant_key(), ms
            )

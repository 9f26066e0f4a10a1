"""The reconciler: applies placements to the tenant table, make-before-break.

Documents arrive from MQTT (`submit`) or at start (`apply`). Intake (pure) decides what is valid and
the plan (pure) what to start, keep and retire; this module does the slow part: auto-choice, checks
against the installed runtimes, model loads under deadlines, draining retired tenants, saving.
Errors are reported through `note_error` (status.errors); the table publishes every change.

Tenants with several candidates are also moved here, under the same lock as placements: away from
a candidate that turned unhealthy (failover) and back once a better one has been healthy long
enough (failback), announced through `publish_event` (docs/reliability.md, "Failover").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from agent.frames import faults
from agent.frames.deadline import call_with_deadline
from agent.frames.health import DriftWatch, Health, Relay, probe
from agent.frames.tenant import Tenant, TenantOptionError
from agent.frames.tenant_table import TenantTable
from agent.placement.auto import AutoPlacer
from agent.placement.intake import Applied, Intake, Outcome, Refused, newest
from agent.placement.plan import check_generation, plan, to_save
from agent.placement.profiler import Profiler
from agent.placement.store import PlacementStore
from agent.protocol.schemas import (
    Candidate,
    Capabilities,
    Failover,
    FailoverEvent,
    Placement,
    Refusal,
    TenantSpec,
)
from agent.service.config import AgentConfig, ConfigError
from agent.service.errors import PlacementRefused
from agent.service.model_repo import Model, ModelError, ModelRepository
from backends import registry
from backends.base import Backend, BackendError, UnknownDevice

log = logging.getLogger(__name__)
T = TypeVar("T")
TenantFactory = Callable[[TenantSpec, Model, Backend], Tenant]


def serving_candidate(tenant: Tenant) -> Candidate:
    """The candidate a tenant was started on, as placed (its device name as written there)."""
    return Candidate(backend=tenant.spec.backend, device=tenant.spec.device)


def settle_heap() -> None:
    """Take what is alive now (runtimes, models, libraries: ~200k objects) out of the cyclic GC.

    Measured: full collections over them took 12-46 ms, on the event loop or a worker, and made
    the p99 of the 70%-load test. Frozen objects are still freed by reference counting; the cycles
    among them wait for the next call (one per placement change), which collects first.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def check_runnable(placement: Placement, repo: ModelRepository) -> None:
    """Refuse what names an unknown model, backend or device (after auto was resolved). Blocking:
    listing devices can scan USB/PCI (Edge TPU) or ask a driver (OpenVINO)."""
    for spec in placement.tenants:
        try:
            repo.manifest(spec.model)
        except ModelError as exc:
            raise PlacementRefused(str(exc)) from exc
        for candidate in spec.candidate_list():
            if candidate.backend not in registry.names():
                raise PlacementRefused(
                    f"unknown backend {candidate.backend!r} (known: {', '.join(registry.names())})"
                )
            backend = registry.get(candidate.backend)
            if backend.available()[0]:
                try:
                    backend.canonical_device(candidate.device)
                except UnknownDevice as exc:
                    raise PlacementRefused(str(exc)) from exc
        # An installed-but-unavailable runtime is not refused: its tenant shows `failed` with the
        # reason while the others serve.


class Reconciler:
    def __init__(
        self,
        config: AgentConfig,
        table: TenantTable,
        repo: ModelRepository,
        make_tenant: TenantFactory,
        probe: Callable[[], Capabilities],
        note_error: Callable[[str], None],
        extend_start: Callable[[float], None],
        intake: Intake,
    ) -> None:
        self.config = config
        self.table = table
        self.repo = repo
        self.make_tenant = make_tenant
        self.probe = probe
        self.note_error = note_error
        self.extend_start = extend_start
        self.intake = intake
        self.store = PlacementStore(config.state_dir / "placement.json")
        self.auto = AutoPlacer(repo, Profiler(config.state_dir / "profiles.db"), self._runtime_call)
        self.accepting = True
        self._lock = asyncio.Lock()
        self._pending: list[bytes] = []  # documents that arrived while a placement was being applied
        self._worker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()  # the apply worker, tenants draining
        # Failover: health per accelerator ("backend:device", lower case), where events go.
        self.health: dict[str, Health] = {}
        self.publish_event: Callable[[bytes], None] | None = None
        self._failing: set[str] = set()  # models with a failover under way
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            active = faults.configure(config.faults)
        except ValueError as exc:
            raise ConfigError(f"faults: {exc}") from exc
        for fault in active.faults:
            note_error(f"FAULT INJECTION IS ON: {fault.text}")

    # -- documents from MQTT ----------------------------------------------------------------------
    def submit(self, payload: bytes) -> None:
        """A document arrived on edge/<id>/placement (event loop)."""
        if not payload or not self.accepting:
            return  # retained placement cleared (keep serving what runs), or the agent is stopping
        # Applying loads models (seconds): run it beside dispatch so frames keep flowing. Documents
        # that arrive meanwhile are not applied one by one: each is checked (refusals reported),
        # and the newest valid one is applied next.
        self._pending.append(payload)
        if self._worker is None or self._worker.done():
            self._worker = self._spawn(self._apply_newest(), "apply-placement")

    async def _apply_newest(self) -> None:
        while self._pending and self.accepting:
            batch, self._pending = self._pending, []
            applied = Applied(self.table.applied_generation, self.table.applied_signature)
            # Off the loop: a document can be as large as the broker allows.
            outcomes = await asyncio.to_thread(self._check_all, batch, applied)
            for outcome in outcomes:
                if isinstance(outcome, Refused):
                    self.table.refuse(Refusal(generation=outcome.generation, reason=outcome.reason))
                    self.note_error(f"placement refused: {outcome.reason}")
            placement = newest(outcomes)
            if placement is not None:
                await self._apply_document(placement)

    def _check_all(self, payloads: list[bytes], applied: Applied) -> list[Outcome]:
        return [self.intake.check(p, applied) for p in payloads]

    async def _apply_document(self, placement: Placement) -> None:
        try:
            await self.apply(placement, source="mqtt")
        except PlacementRefused as exc:
            self.table.refuse(Refusal(generation=placement.generation, reason=str(exc)))
            self.note_error(f"placement generation {placement.generation} refused: {exc}")
        except Exception as exc:  # a bug or a runtime error: reported, not a silently dead task
            log.exception("placement generation %d failed", placement.generation)
            reason = f"internal error while applying: {type(exc).__name__}: {exc}"
            self.table.refuse(Refusal(generation=placement.generation, reason=reason))
            self.note_error(f"placement generation {placement.generation}: {reason}")

    # -- applying ---------------------------------------------------------------------------------
    async def apply(self, placement: Placement, source: str) -> None:
        """Reconcile running tenants to `placement`, make-before-break: start new, then drain old."""
        asked = placement  # as published: "auto" stays auto in the saved copy (re-chosen at start)
        async with self._lock:
            check_generation(placement.generation, self.table.applied_generation)
            # Models added to the repository since the start are known from now on (status, console).
            models = await asyncio.to_thread(self.repo.names)
            caps = self.table.capabilities
            if models != caps.models:
                self.table.set_capabilities(caps.model_copy(update={"models": models}))
            if not self.table.capabilities.backends:  # the probe at start gave up (a hung device): again
                self.table.set_capabilities(await self._runtime_call(self.probe, "probing the backends"))
            placement, choices = await self.auto.resolve(placement)
            await self._runtime_call(
                functools.partial(check_runnable, placement, self.repo), "checking the placement"
            )
            self.table.accepted(placement.generation, choices)
            steps = plan(placement, self.table.serving_specs(), self.table.failed_models())
            for model in steps.keep:
                self.table.clear_failed(model)  # a failed move back to what serves: cleared
            for spec in steps.start:
                tenant = await self._start_tenant(spec)
                if tenant is None:
                    continue  # failed: the old tenant (if any) keeps serving
                old = self.table.install(tenant)
                if old is not None:
                    self._retire(old)
            for model in steps.retire:
                old = self.table.remove(model)
                if old is not None:
                    self._retire(old)
            for model in steps.forget:
                self.table.clear_failed(model)
            self.table.applied(placement.generation, asked.signature)
            saved = to_save(asked, placement, self.table.serving_specs())
            try:
                await asyncio.to_thread(self.store.save, saved)
            except OSError as exc:
                self.note_error(f"could not save the placement for the next start: {exc}")
            log.info(
                "placement generation %d applied (%s): %s",
                placement.generation,
                source,
                ", ".join(t.name for t in self.table.serving()) or "no tenants",
            )
            settle_heap()

    async def _start_tenant(self, spec: TenantSpec) -> Tenant | None:
        """Load and warm up a tenant on its first candidate that loads; None (and the tenant shown
        `failed` with why) if none can."""
        self._loop = asyncio.get_running_loop()
        self.table.loading(spec)
        errors = []
        # In order, healthy ones first: a candidate known hung or failing is tried last.
        for candidate in sorted(spec.candidate_list(), key=lambda c: not self._health(c).healthy):
            tenant = await self._start_on(spec, candidate)
            if isinstance(tenant, Tenant):
                return tenant
            errors.append(tenant if len(spec.candidate_list()) == 1 else f"{candidate.label}: {tenant}")
        message = "; ".join(errors)
        self.table.failed(spec, message)
        self.note_error(f"{spec.model} on {spec.backend}:{spec.device}: {message}")
        return None

    async def _start_on(self, placed: TenantSpec, candidate: Candidate) -> Tenant | str:
        """A tenant of `placed` loaded on `candidate`, started; else why not (the candidate is
        then unhealthy)."""
        spec = placed.on(candidate)
        try:
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
            model = await asyncio.to_thread(self.repo.load, spec.model)
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
        except Exception as exc:  # whatever it is, the tenant is `failed` with the reason, not stuck loading
            expected = isinstance(exc, BackendError | ModelError | OSError)
            message = str(exc) if expected else f"{type(exc).__name__}: {exc}"
            if not expected:
                log.exception("tenant %s on %s:%s: unexpected error", spec.model, spec.backend, spec.device)
            log.error("tenant %s on %s:%s failed: %s", spec.model, spec.backend, spec.device, message)
            if placed.candidates and not isinstance(exc, TenantOptionError):
                self._health(candidate).fail(f"load failed: {message}", *self._backoff())
            return message
        tenant.placed = placed
        health = self._health(candidate)
        if not health.healthy:  # it loaded and warmed up: as good as a probe
            health.passed()
        if len(placed.candidate_list()) > 1:
            failover = self.config.failover
            tenant.on_unhealthy = self._on_unhealthy
            tenant.errors_to_fail = failover.errors_to_fail
            tenant.stall_timeout_s = failover.stall_timeout_s
            tenant.drift = DriftWatch(failover.drift_factor) if failover.drift_factor > 0 else None
        tenant.start()
        log.info("tenant %s ready", tenant.name)
        return tenant

    # -- failover and failback --------------------------------------------------------------------
    def _backoff(self) -> tuple[float, float]:
        return self.config.failover.probe_interval_s, self.config.failover.backoff_max_s

    def _health(self, candidate: Candidate) -> Health:
        label = candidate.label.lower()
        return self.health.setdefault(label, Health(label))

    def _on_unhealthy(self, tenant: Tenant, kind: str, reason: str) -> Relay | None:
        """A tenant's serving candidate turned unhealthy (any thread). A stall or errors: its frames
        are held in a relay until the next candidate serves; a drift: it serves on meanwhile."""
        loop = self._loop
        if loop is None or not self.accepting:
            return None
        noticed = tenant.fault_since if kind != "drift" and tenant.fault_since else time.monotonic()
        relay = None if kind == "drift" else Relay(tenant.reject, self.config.scheduler.queue_depth)
        self._failing.add(tenant.placed.model)
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
            await self._fail_over_locked(tenant, kind, reason, relay, noticed)
        finally:
            self._failing.discard(tenant.placed.model)

    async def _fail_over_locked(
        self, tenant: Tenant, kind: str, reason: str, relay: Relay | None, noticed: float
    ) -> None:
        try:
            await self._fail_over_now(tenant, kind, reason, relay, noticed)
        except asyncio.CancelledError:  # the agent is stopping: what the relay holds is answered
            if relay is not None:
                relay.fail("the agent stopped while this frame moved to another candidate", "shutting_down")
            raise

    async def _fail_over_now(
        self, tenant: Tenant, kind: str, reason: str, relay: Relay | None, noticed: float
    ) -> None:
        placed, here = tenant.placed, serving_candidate(tenant)
        self._health(here).fail(f"{kind}: {reason}", *self._backoff(), kind=kind)
        log.error("tenant %s: %s on %s (%s); failing over", placed.model, kind, here.label, reason)
        async with self._lock:
            current = self.table.get(placed.model)
            if current is not tenant:  # a placement or a failback replaced it meanwhile
                if relay is not None:
                    relay.connect(current) if current is not None else relay.fail("the tenant was removed")
                return
            healthy = [c for c in placed.candidate_list() if self._health(c).healthy]
            moved = await self._move(tenant, healthy, f"{kind}: {reason}", relay, noticed)
        if not moved:
            message = f"no other candidate could serve {placed.model} after a {kind} on {here.label}"
            if relay is not None:
                relay.fail(message)
            self.note_error(message)

    async def _move(
        self, tenant: Tenant, candidates: list[Candidate], reason: str, relay: Relay | None, noticed: float
    ) -> bool:
        """Load the first of `candidates` (other than where `tenant` serves) that loads, install it,
        hand it the relay's frames, retire `tenant` (it drains what it holds), announce. Under the
        lock; False when none loaded (`tenant` stays)."""
        here = serving_candidate(tenant)
        stranded = tenant.state == "failed"  # its own candidate may take it back, freshly loaded
        for candidate in candidates:
            if candidate.label.lower() == here.label.lower() and not stranded:
                continue
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
        ranks = [c.label.lower() for c in old.placed.candidate_list()]
        source, target = serving_candidate(old), serving_candidate(new)
        back = ranks.index(target.label.lower()) < ranks.index(source.label.lower())
        move = Failover.model_validate(
            {
                "kind": "failback" if back else "failover",
                "from": f"{old.spec.backend}:{old.device}",
                "to": f"{new.spec.backend}:{new.device}",
                "reason": reason,
                "recovery_s": None if back else round(time.monotonic() - began, 3),
            }
        )
        self.table.record_failover(new.placed.model, move)
        log.warning(
            "tenant %s: %s from %s to %s (%s)%s",
            new.placed.model,
            move.kind,
            move.source,
            move.to,
            reason,
            "" if move.recovery_s is None else f", serving again {move.recovery_s:.2f} s after the fault",
        )
        if self.publish_event is not None:
            event = FailoverEvent(
                **move.model_dump(), device_id=self.config.device_id, model=new.placed.model
            )
            self.publish_event(event.model_dump_json().encode())

    async def health_loop(self) -> None:
        """Once a second: probe unhealthy candidates that are due (backoff), and move tenants back
        to a better candidate healthy for long enough (or to any that serves, when theirs failed)."""
        while True:
            await asyncio.sleep(1.0)
            if not self.accepting:
                continue  # stopping: nothing moves any more
            try:
                await self._check_health()
            except Exception:  # a bug here must not stop the agent
                log.exception("health check failed")

    async def _check_health(self) -> None:
        failover = self.config.failover
        now = time.monotonic()
        for tenant in self.table.serving():
            placed = tenant.placed
            if len(placed.candidate_list()) < 2 or placed.model in self._failing:
                continue
            here = serving_candidate(tenant)
            ranks = [c.label.lower() for c in placed.candidate_list()]
            stranded = tenant.state == "failed"  # no candidate could take it: any will do
            better = [
                c
                for c in placed.candidate_list()
                if stranded or ranks.index(c.label.lower()) < ranks.index(here.label.lower())
            ]
            if not stranded and ranks.index(here.label.lower()) == 0:
                health = self._health(here)
                if health.failures and now - health.since > failover.backoff_max_s:
                    health.failures = 0  # serving steadily again: the backoff starts over
            here_health = self._health(here)
            if not stranded and here_health.device_fault and not tenant.handing_off:
                # Another tenant found this accelerator hung or failing: move before it meets it too.
                async with self._lock:
                    if self.table.get(placed.model) is tenant:
                        others = [c for c in placed.candidate_list() if self._health(c).healthy]
                        reason = f"{here.label} unhealthy ({here_health.reason})"
                        await self._move(tenant, others, reason, None, time.monotonic())
                continue
            for candidate in better:
                health = self._health(candidate)
                if health.due(now):
                    health.probing = True  # in the background: a hung probe holds no other check
                    self._spawn(self._probe(tenant, candidate, health), f"probe-{candidate.label}")
                hold = failover.failback_after_s * 2 ** max(0, health.failures - 1)
                if health.healthy and (stranded or now - health.since >= min(hold, failover.backoff_max_s)):
                    async with self._lock:
                        if self.table.get(placed.model) is not tenant:
                            break
                        reason = (
                            f"{candidate.label} healthy again"
                            if not stranded
                            else f"{candidate.label} serves again"
                        )
                        if await self._move(tenant, [candidate], reason, None, now):
                            break

    async def _probe(self, tenant: Tenant, candidate: Candidate, health: Health) -> None:
        """One inference of the tenant's model on the idle candidate, under the inference deadline."""
        health.probing = True
        loop = asyncio.get_running_loop()

        def finished() -> None:
            health.probing = False

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
                    loop.call_soon_threadsafe(finished)

        try:
            timeout = self.config.scheduler.infer_timeout_s + self.config.scheduler.load_timeout_s
            ms = await call_with_deadline(run, timeout, None)
        except Exception as exc:  # a hang (TimeoutError), a load failure, a runtime error
            reason = "probe did not return" if isinstance(exc, TimeoutError) else f"probe failed: {exc}"
            health.fail(reason, *self._backoff())
            log.warning("candidate %s of %s: %s", candidate.label, tenant.placed.model, reason)
        else:
            health.passed()
            log.warning(
                "candidate %s of %s: probe passed (%.1f ms)", candidate.label, tenant.placed.model, ms
            )

    def _retire(self, tenant: Tenant) -> None:
        """Drain an old tenant in the background: its queued frames are still answered."""
        self.table.start_draining(tenant)

        async def drain() -> None:
            await asyncio.to_thread(tenant.drain, self.config.scheduler.drain_timeout_s)
            if self.table.drained(tenant):
                settle_heap()  # the retired tenant's reference cycles were frozen with it

        self._spawn(drain(), f"drain-{tenant.name}")

    async def _runtime_call(self, fn: Callable[[], T], what: str) -> T:
        """A call that asks runtimes or drivers (devices, profiling) during a placement, under the
        load deadline: a wedged device refuses the placement instead of holding it for ever."""
        timeout = self.config.scheduler.load_timeout_s
        self.extend_start(timeout)
        try:
            return await call_with_deadline(fn, timeout, None)
        except TimeoutError:
            raise PlacementRefused(
                f"{what} did not finish within {timeout:g} s (a device or driver may be hung)"
            ) from None

    def saved(self) -> Placement | None:
        """The placement saved by the last apply (blocking)."""
        return self.store.load()

    # -- shutdown ---------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A short-lived task, forgotten once done (a daemon applies placements for months)."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def stop_applying(self) -> None:
        """No placement is applied from now on; one being applied stops at its next step (a load in
        flight is abandoned and closed when it ends), so no tenant starts after the drain."""
        self.accepting = False
        self._pending.clear()
        moving = ("apply-placement", "failover-", "probe-")  # frames a failover holds are answered
        applying = [t for t in self._background if t.get_name().startswith(moving)]
        for task in applying:
            task.cancel()
        for task in applying:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def cancel_background(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

"""The reconciler: applies placements to the tenant table, make-before-break.

Documents arrive from MQTT (`submit`) or at start (`apply`). Intake (pure) decides what is valid and
the plan (pure) what to start, keep and retire; this module does the slow part: auto-choice, checks
against the installed runtimes, model loads under deadlines, draining retired tenants, saving.
Errors are reported through `note_error` (status.errors); the table publishes every change.

Tenants with several candidates are also moved under the same lock as placements, by the failover
mover (failover.py, applying failover_policy.py): away from a candidate that turned unhealthy
(failover) and back once a better one has been healthy long enough (failback), announced through
`publish_event` (docs/reliability.md, "Failover"). Loading a tenant on a candidate is starter.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from agent.frames import faults
from agent.frames.deadline import call_with_deadline
from agent.frames.health import HealthBook
from agent.frames.tenant import Tenant
from agent.frames.tenant_table import TenantTable
from agent.placement.auto import AutoPlacer
from agent.placement.failover import FailoverMover
from agent.placement.intake import Applied, Intake, Outcome, Refused, newest
from agent.placement.plan import check_cascades, check_generation, describe_with, plan, to_save
from agent.placement.profiler import Profiler
from agent.placement.starter import Starter, TenantFactory
from agent.placement.store import PlacementStore
from agent.protocol.schemas import Capabilities, Placement, Refusal
from agent.service.config import AgentConfig, ConfigError
from agent.service.errors import PlacementRefused
from agent.service.model_repo import ModelError, ModelRepository
from backends import registry
from backends.base import UnknownDevice

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    serves: dict[tuple[str, str], str] = {}  # (model, version) -> the tenant key serving it
    for spec in placement.tenants:
        try:
            _, manifest = repo.manifest(spec.model, spec.version)
        except ModelError as exc:
            raise PlacementRefused(str(exc)) from exc
        # Side by side means two versions: an unpinned tenant is the newest installed, and that
        # version pinned beside it would be the same model twice.
        other = serves.setdefault((spec.model, manifest.version), spec.tenant_key())
        if other != spec.tenant_key():
            raise PlacementRefused(
                f"{other} and {spec.tenant_key()} would both serve {spec.model} {manifest.version} "
                "(a tenant without a version serves the newest installed); one tenant per version"
            )
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
    check_cascades(placement, describe_with(repo))


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
        publish_event: Callable[[bytes], None],
    ) -> None:
        self.config = config
        self.table = table
        self.repo = repo
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
        # Failover: health per accelerator (by device_key); events go to edge/<id>/events.
        self.health = HealthBook()
        self.mover = FailoverMover(
            config,
            table,
            self._lock,
            self.health,
            # The starter is made below: each needs the other.
            start_on=lambda placed, candidate: self.starter.start_on(placed, candidate),  # noqa: PLW0108
            retire=self._retire,
            spawn=self._spawn,
            note_error=note_error,
            publish_event=publish_event,
            accepting=lambda: self.accepting,
        )
        self.starter = Starter(
            config, table, repo, make_tenant, self.health, self.mover.on_unhealthy, note_error, extend_start
        )
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
        self.mover.attach(asyncio.get_running_loop())
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
                tenant = await self.starter.start_tenant(spec)
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

    async def health_loop(self) -> None:
        """Probes and failbacks, once a second (the failover mover's)."""
        await self.mover.health_loop()

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

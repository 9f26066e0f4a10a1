"""The agent: wires the MQTT session, ingest, tenants, placement, outbox, metrics and telemetry.

Event loop: receives messages, validates them cheaply, routes frames to tenant queues, publishes.
Worker threads: decode, preprocess and infer (tenants), write SQLite (metrics), load models.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from agent import __version__
from agent.config import AgentConfig, ConfigError
from agent.device_stats import DeviceStats
from agent.ingest import Frame, FrameMeta, IngestError, parse_frame
from agent.metrics import MetricsStore
from agent.model_repo import ModelError, ModelRepository
from agent.mqtt_session import Incoming, MqttSession
from agent.outbox import Outbox, OutboxStore
from agent.placer import Profiler, candidates_for, choose, shortlist
from agent.protocol.schemas import (
    AutoChoice,
    BackendCapability,
    Capabilities,
    DeviceTelemetry,
    ErrorCode,
    ErrorInfo,
    ErrorResult,
    InferResult,
    Placement,
    PlacementStatus,
    Refusal,
    Status,
    Telemetry,
    TenantSpec,
    TenantState,
    TenantStatus,
    TenantTelemetry,
)
from agent.sd_notify import notify, watchdog_interval_s, watchdog_loop
from agent.protocol.signing import SignatureRefused, load_public_key, verify
from agent.tenant import Tenant
from agent.protocol.topics import Topics
from backends import registry
from backends.base import BackendError, UnknownDevice

log = logging.getLogger(__name__)
T = TypeVar("T")


class PlacementRefused(Exception):
    """A placement document that cannot be applied; the current placement keeps serving."""


async def call_with_deadline(fn: Callable[[], T], timeout_s: float, on_late: Callable[[T], None] | None) -> T:
    """Run blocking `fn` on a daemon thread of its own and wait at most `timeout_s` (TimeoutError).

    For calls into a runtime that may hang (a model load on a wedged accelerator): the placement
    then goes on without it, and the process can still exit (asyncio.to_thread's executor threads
    are joined at exit). If `fn` completes after the deadline, `on_late` gets its result to release.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    lock = threading.Lock()
    flags = {"abandoned": False, "finished": False}

    def settle(value: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_result(value) if error is None else future.set_exception(error)

    def release(value: Any) -> None:
        if on_late is not None:
            with contextlib.suppress(Exception):
                on_late(value)

    def run() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with lock:
            flags["finished"] = True
            late = flags["abandoned"]
        if late:
            if error is None:
                release(value)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="runtime-call", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except (TimeoutError, asyncio.CancelledError):  # cancelled: the agent is stopping
        with lock:
            flags["abandoned"] = True
            finished = flags["finished"]
        if finished:  # it completed just now, its result already on the way: release it there
            future.add_done_callback(lambda f: release(f.result()) if f.exception() is None else None)
        raise


def frame_meta(props: Properties | None) -> FrameMeta:
    if props is None:
        return FrameMeta()
    user = {str(k): str(v) for k, v in (getattr(props, "UserProperty", None) or [])}
    response_topic = getattr(props, "ResponseTopic", None)
    if response_topic and ("+" in response_topic or "#" in response_topic):
        response_topic = None  # a wildcard topic cannot be published to
    return FrameMeta(
        correlation_data=getattr(props, "CorrelationData", None),
        response_topic=response_topic or None,
        user_properties=user,
        expiry_s=getattr(props, "MessageExpiryInterval", None),
    )


def settle_heap() -> None:
    """Take what is alive now (runtimes, models, libraries: ~200k objects) out of the cyclic GC.

    Measured: full collections over them took 12-46 ms, on the event loop or a worker, and made
    the p99 of the 70%-load test. Frozen objects are still freed by reference counting; the cycles
    among them wait for the next call (one per placement change), which collects first.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class _Redelivery(Exception):
    """The applied, signed document arrived again (retained, on reconnect): nothing to do."""


def _generation_of(payload: bytes) -> int | None:
    """Best-effort generation of a document that failed validation, for the refusal report."""
    try:
        value = json.loads(payload).get("generation")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


class Agent:
    def __init__(self, config: AgentConfig, backend_options: dict[str, dict[str, Any]] | None = None) -> None:
        self.config = config
        self.topics = Topics(config.device_id, config.broker.topic_prefix)
        self.repo = ModelRepository(config.models_dir)
        # Extra options per backend name (tests give the fake backend its delay here).
        self.backend_options = backend_options or {}
        self.tenants: dict[str, Tenant] = {}  # model -> the tenant serving it now
        self.failed: dict[str, TenantStatus] = {}  # model -> why its tenant could not start
        self.draining: list[Tenant] = []
        self.started_at = time.time()
        self.errors: deque[str] = deque(maxlen=20)
        self.rejected: Counter[str] = Counter()
        self.capabilities = Capabilities()
        self.desired_generation: int | None = None
        self.applied_generation: int | None = None
        self.refused: Refusal | None = None
        self.auto_choices: dict[str, AutoChoice] = {}  # model -> why auto placed it there
        self.profiler = Profiler(config.state_dir / "profiles.db")
        key = config.security.placement_public_key
        try:
            self._verify_key = load_public_key(key) if key else None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"security.placement_public_key: {exc}") from exc
        self._applied_signature: str | None = None
        self.device_stats = DeviceStats()
        self.accepting = True
        self.ready = asyncio.Event()  # initial placement loaded (systemd READY=1)
        self._placement_lock = asyncio.Lock()
        self._pending_placements: list[bytes] = []  # arrived while a placement was being applied
        self._placement_worker: asyncio.Task[None] | None = None
        self._status_dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []  # long-lived: session, outbox, telemetry, status...
        self._background: set[asyncio.Task[Any]] = set()  # placements being applied, tenants draining
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics = MetricsStore(
            config.metrics_db, config.metrics.retention_hours * 3600.0, config.metrics.flush_interval_s
        )
        client_id = config.broker.client_id or f"edge-agent-{config.device_id}"
        self.session = MqttSession(
            config.broker,
            client_id,
            will_topic=self.topics.status,
            will_payload=self._offline_payload(),
            on_connect=self._on_connect,
        )
        self.session.subscribe(self.topics.infer, self._on_frame, qos=1)
        self.session.subscribe(self.topics.infer_any_model, self._on_frame, qos=1)
        self.session.subscribe(self.topics.placement, self._on_placement, qos=1)
        self.outbox: Outbox | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Everything up to serving: state dir, metrics, capabilities, initial placement, MQTT."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.config.state_dir.mkdir, parents=True, exist_ok=True)
        store = OutboxStore(self.config.state_dir / "outbox.db")
        unsent = await asyncio.to_thread(store.load)
        self.outbox = Outbox(self.session, self._loop, store, unsent)
        await asyncio.to_thread(self.metrics.start)
        # A wedged device can hang its runtime's probe: start without it rather than never (systemd
        # would kill a start that takes minutes). Placements list devices again, under a deadline.
        probe_s = min(60.0, self.config.scheduler.load_timeout_s)
        self._extend_start(probe_s)
        try:
            self.capabilities = await call_with_deadline(self._probe_capabilities, probe_s, None)
        except TimeoutError:
            self.capabilities = Capabilities(models=await asyncio.to_thread(self.repo.names))
            self._note_error(f"probing the backends took over {probe_s:g} s (a device or driver may be hung)")
        initial = await asyncio.to_thread(self._saved_placement) or self.config.placement
        try:
            await self.apply_placement(
                initial, source="saved" if initial is not self.config.placement else "config"
            )
        except PlacementRefused as exc:
            self._note_error(f"initial placement refused: {exc}")
        self.ready.set()
        self._tasks = [
            asyncio.create_task(self.session.run(), name="mqtt"),
            asyncio.create_task(self.outbox.run(), name="outbox"),
            asyncio.create_task(self._telemetry_loop(), name="telemetry"),
            asyncio.create_task(self._status_loop(), name="status"),
            asyncio.create_task(self._stall_loop(), name="stalls"),
        ]
        if self.config.metrics.prometheus_listen:
            from agent.prometheus import serve

            self._tasks.append(
                asyncio.create_task(
                    serve(self.config.metrics.prometheus_listen, self.telemetry), name="prometheus"
                )
            )
        interval = watchdog_interval_s()
        if interval is not None:
            self._tasks.append(asyncio.create_task(watchdog_loop(interval), name="watchdog"))
        tenants = ", ".join(t.name for t in self.tenants.values()) or "no tenants"
        notify(f"READY=1\nSTATUS=serving {tenants}")

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        stop_task = asyncio.create_task(stop.wait())
        # A crashed internal task is a bug: stop (non-zero exit) rather than limp on.
        done, _ = await asyncio.wait([stop_task, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in done if t is not stop_task and t.exception() is not None]
        stop_task.cancel()
        await self.shutdown()
        if crashed:
            raise RuntimeError(f"internal task {crashed[0].get_name()} failed") from crashed[0].exception()

    async def shutdown(self) -> None:
        """Stop taking frames, answer what is queued, publish the final status, flush SQLite."""
        self.accepting = False
        notify("STOPPING=1\nSTATUS=draining queued frames")
        timeout = self.config.scheduler.drain_timeout_s
        # A placement being applied stops at its next step (a load in flight is abandoned and
        # closed when it ends), so no tenant starts after the drain below.
        applying = [t for t in self._background if t.get_name() == "apply-placement"]
        self._pending_placements.clear()
        for task in applying:
            task.cancel()
        for task in applying:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        tenants = list(self.tenants.values()) + self.draining  # drain() runs once per tenant
        await asyncio.gather(*(asyncio.to_thread(t.drain, timeout) for t in tenants))
        if self.outbox is not None and self.session.connected.is_set():
            await self.outbox.flush(timeout_s=5.0)
        # Nothing may publish "online" after the final offline status below.
        loops = [t for t in self._tasks if t.get_name() in ("status", "telemetry", "stalls")]
        for task in loops:
            task.cancel()
        for task in loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.session.stop(final=(self.topics.status, self._offline_payload()))
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.close)
        await asyncio.to_thread(self.metrics.stop)
        log.info("stopped")

    # -- ingest ---------------------------------------------------------------------------------
    def _on_frame(self, message: Incoming) -> None:
        meta = frame_meta(message.properties)
        try:
            frame = parse_frame(
                message.payload,
                meta,
                topic_model=self.topics.model_from_topic(message.topic),
                default_model=self.config.ingest.default_model,
                max_bytes=self.config.ingest.max_payload_bytes,
            )
        except IngestError as exc:
            self.rejected[exc.code] += 1
            self._answer_unqueued(exc.request_id, exc.model, meta, exc.code, exc.message)
            return
        if not self.accepting:
            self._refuse(frame, "shutting_down", "the agent is stopping")
            return
        tenant = self.tenants.get(frame.model)
        if tenant is None:
            if frame.model in self.failed:
                entry = self.failed[frame.model]
                why = "is still loading" if entry.state == "loading" else f"failed to load: {entry.error}"
                self._refuse(frame, "unavailable", f"model {frame.model!r} {why}")
            else:
                served = ", ".join(sorted(self.tenants)) or "none"
                self._refuse(frame, "unknown_model", f"no tenant serves {frame.model!r} (served: {served})")
            return
        tenant.submit(frame)

    def _refuse(self, frame: Frame, code: ErrorCode, message: str) -> None:
        self.rejected[code] += 1
        self.emit(
            frame,
            ErrorResult(
                request_id=frame.request_id, model=frame.model, error=ErrorInfo(code=code, message=message)
            ),
        )

    def _answer_unqueued(
        self, request_id: str, model: str | None, meta: FrameMeta, code: ErrorCode, message: str
    ) -> None:
        frame = Frame(
            request_id=request_id,
            model=model or "",
            image=b"",
            received=time.monotonic(),
            response_topic=meta.response_topic,
            correlation_data=meta.correlation_data,
        )
        self.emit(
            frame,
            ErrorResult(request_id=request_id, model=model, error=ErrorInfo(code=code, message=message)),
        )

    def emit(self, frame: Frame, outcome: InferResult | ErrorResult) -> None:
        """Send a frame's one answer (thread-safe): the result topic, plus its response topic."""
        if self.outbox is None:
            return
        payload = outcome.model_dump_json(exclude_none=True).encode()
        if frame.response_topic:
            self.outbox.put_many(
                [
                    (self.topics.result, payload, 1, None),
                    (frame.response_topic, payload, 1, frame.correlation_data),
                ]
            )
        else:
            self.outbox.put(self.topics.result, payload)

    # -- placement ------------------------------------------------------------------------------
    def _on_placement(self, message: Incoming) -> None:
        if not message.payload or not self.accepting:
            return  # retained placement cleared (keep serving what runs), or the agent is stopping
        # Applying loads models (seconds): run it beside dispatch so frames keep flowing. Documents
        # that arrive meanwhile are not applied one by one: each is checked (refusals reported),
        # and the newest valid one is applied next.
        self._pending_placements.append(message.payload)
        if self._placement_worker is None or self._placement_worker.done():
            self._placement_worker = asyncio.create_task(self._apply_newest(), name="apply-placement")
            self._background.add(self._placement_worker)
            self._placement_worker.add_done_callback(self._background.discard)

    async def _apply_newest(self) -> None:
        while self._pending_placements and self.accepting:
            batch, self._pending_placements = self._pending_placements, []
            valid = [p for p in map(self._parse_document, batch) if p is not None]
            if valid:
                newest = max(reversed(valid), key=lambda p: p.generation)  # the later of equals
                await self._apply_document(newest)

    def _parse_document(self, payload: bytes) -> Placement | None:
        """The placement in `payload`, or None: refused (reported in status) or a redelivery."""
        try:
            doc = json.loads(payload)
            if self._verify_key is not None:
                self._verify_signature(doc, self._verify_key)
            return Placement.model_validate(doc)
        except _Redelivery:
            return None  # the retained document we already applied, delivered again on reconnect
        except (ValueError, SignatureRefused) as exc:
            if isinstance(exc, ValidationError):
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}"
                    for e in exc.errors()[:5]
                )
            elif isinstance(exc, SignatureRefused):
                problems = f"signature: {exc}"
            else:
                problems = f"invalid JSON: {exc}"
            self.refused = Refusal(generation=_generation_of(payload), reason=problems)
            self._note_error(f"placement refused: {problems}")
            return None

    async def _apply_document(self, placement: Placement) -> None:
        try:
            await self.apply_placement(placement, source="mqtt")
        except PlacementRefused as exc:
            self.refused = Refusal(generation=placement.generation, reason=str(exc))
            self._note_error(f"placement generation {placement.generation} refused: {exc}")
        except Exception as exc:  # a bug or a runtime error: reported, not a silently dead task
            log.exception("placement generation %d failed", placement.generation)
            reason = f"internal error while applying: {type(exc).__name__}: {exc}"
            self.refused = Refusal(generation=placement.generation, reason=reason)
            self._note_error(f"placement generation {placement.generation}: {reason}")

    def _verify_signature(self, doc: Any, key: Ed25519PublicKey) -> None:
        if not isinstance(doc, dict):
            raise SignatureRefused("unsigned: not a JSON object")
        generation = doc.get("generation")
        # The applied document redelivered (reconnect, restart) is recognised by its signature
        # before expiry is checked: it may have expired since, and that is not a refusal.
        if (
            self.applied_generation is not None
            and generation == self.applied_generation
            and self._applied_signature
            and doc.get("signature") == self._applied_signature
        ):
            raise _Redelivery
        verify(doc, key, self.config.security.placement_max_age_s)
        if self.applied_generation is not None and generation == self.applied_generation:
            raise SignatureRefused(f"replayed: generation {generation} is already applied")
        if (
            self.applied_generation is not None
            and isinstance(generation, int)
            and generation < self.applied_generation
        ):
            raise SignatureRefused(
                f"replayed: generation {generation} is older than the applied {self.applied_generation}"
            )

    def _check(self, placement: Placement) -> None:
        """Refuse what names an unknown model, backend or device (after auto was resolved)."""
        for spec in placement.tenants:
            try:
                self.repo.manifest(spec.model)
            except ModelError as exc:
                raise PlacementRefused(str(exc)) from exc
            if spec.backend not in registry.names():
                raise PlacementRefused(
                    f"unknown backend {spec.backend!r} (known: {', '.join(registry.names())})"
                )
            backend = registry.get(spec.backend)
            if backend.available()[0]:
                try:
                    backend.canonical_device(spec.device)
                except UnknownDevice as exc:
                    raise PlacementRefused(str(exc)) from exc
            # An installed-but-unavailable runtime is not refused: its tenant shows `failed` with the
            # reason while the others serve.

    async def apply_placement(self, placement: Placement, source: str) -> None:
        """Reconcile running tenants to `placement`, make-before-break: start new, then drain old."""
        signature = placement.signature
        asked = placement  # as published: "auto" stays auto in the saved copy (re-chosen at start)
        async with self._placement_lock:
            if self.applied_generation is not None and placement.generation < self.applied_generation:
                raise PlacementRefused(
                    f"generation {placement.generation} is older than the applied {self.applied_generation}"
                )
            # Models added to the repository since the start are known from now on (status, console).
            models = await asyncio.to_thread(self.repo.names)
            if models != self.capabilities.models:
                self.capabilities = self.capabilities.model_copy(update={"models": models})
            if not self.capabilities.backends:  # the probe at start gave up (a hung device): again
                self.capabilities = await self._runtime_call(self._probe_capabilities, "probing the backends")
            placement, choices = await self._resolve_auto(placement)
            # Off the loop: listing devices can scan USB/PCI (Edge TPU) or ask a driver (OpenVINO).
            await self._runtime_call(functools.partial(self._check, placement), "checking the placement")
            self.auto_choices = choices
            self.refused = None
            self.desired_generation = placement.generation
            self._mark_dirty()
            wanted = {spec.model: spec for spec in placement.tenants}
            for spec in placement.tenants:
                current = self.tenants.get(spec.model)
                if current is not None and current.spec.key() == spec.key():
                    self.failed.pop(spec.model, None)  # a failed move back to what serves: cleared
                    continue
                tenant = await self._start_tenant(spec)
                if tenant is None:
                    continue  # failed: the old tenant (if any) keeps serving
                self.tenants[spec.model] = tenant  # new frames go to the new tenant from here on
                self.failed.pop(spec.model, None)
                if current is not None:
                    self._retire(current)
                self._mark_dirty()
            for model in list(self.tenants):
                if model not in wanted:
                    self._retire(self.tenants.pop(model))
            for model in list(self.failed):
                if model not in wanted:
                    del self.failed[model]
            self.applied_generation = placement.generation
            self._applied_signature = signature  # its retained copy, redelivered, is not a replay
            # Saved for the next start: what serves now. A model whose move failed is saved as the
            # tenant that kept serving it, so a restart does not turn a working model into a failed one.
            saved = []
            for spec in asked.tenants:
                running = self.tenants.get(spec.model)
                failed_move = running is not None and running.spec.key() != wanted[spec.model].key()
                saved.append(running.spec if failed_move and running is not None else spec)
            try:
                await asyncio.to_thread(self._save_placement, asked.model_copy(update={"tenants": saved}))
            except OSError as exc:
                self._note_error(f"could not save the placement for the next start: {exc}")
            log.info(
                "placement generation %d applied (%s): %s",
                placement.generation,
                source,
                ", ".join(t.name for t in self.tenants.values()) or "no tenants",
            )
            self._mark_dirty()
            settle_heap()

    def _extend_start(self, seconds: float) -> None:
        """Before READY, tell systemd a step may take `seconds` (its TimeoutStartSec would otherwise
        restart an agent whose first TensorRT build, or a deadline on a hung device, runs long)."""
        if not self.ready.is_set():
            notify(f"EXTEND_TIMEOUT_USEC={int((seconds + 30.0) * 1_000_000)}")

    async def _runtime_call(self, fn: Callable[[], T], what: str) -> T:
        """A call that asks runtimes or drivers (devices, profiling) during a placement, under the
        load deadline: a wedged device refuses the placement instead of holding it for ever."""
        timeout = self.config.scheduler.load_timeout_s
        self._extend_start(timeout)
        try:
            return await call_with_deadline(fn, timeout, None)
        except TimeoutError:
            raise PlacementRefused(
                f"{what} did not finish within {timeout:g} s (a device or driver may be hung)"
            ) from None

    async def _resolve_auto(self, placement: Placement) -> tuple[Placement, dict[str, AutoChoice]]:
        """Replace `backend: "auto"` / `device: "auto"` with measured choices (profiles cached)."""
        autos = [
            t
            for t in placement.tenants
            if t.backend == "auto" or (t.device.lower() == "auto" and t.backend != "openvino")
        ]
        if not autos:
            return placement, {}
        fixed = {t.model: (t.backend, t.device) for t in placement.tenants if t not in autos}
        measured: dict[str, dict[tuple[str, str], float]] = {}
        for spec in autos:
            try:
                model = await asyncio.to_thread(self.repo.load, spec.model)
            except ModelError as exc:
                raise PlacementRefused(str(exc)) from exc
            cands = await self._runtime_call(
                functools.partial(candidates_for, spec.backend, spec.device),
                f"listing devices for {spec.model}",
            )
            figures = {}
            for backend, device in cands:
                figures[(backend, device)] = await self._runtime_call(
                    functools.partial(self.profiler.measure, model, backend, device, spec.instances),
                    f"measuring {spec.model} on {backend}:{device}",
                )
            figures = {c: f for c, f in figures.items() if f > 0}
            if not figures:
                raise PlacementRefused(f"auto placement of {spec.model}: no available backend could run it")
            measured[spec.model] = figures
        picks = choose(measured, fixed)
        together: dict[str, float] | None = None
        if len(autos) >= 2:
            picks, together = await self._choose_together(autos, measured, picks)
        choices: dict[str, AutoChoice] = {}
        tenants = []
        for original in placement.tenants:
            spec = original
            if spec.model in picks:
                backend, device = picks[spec.model]
                solo_best = max(measured[spec.model], key=lambda c: measured[spec.model][c])
                if together is not None:
                    reason = (
                        f"measured together with the other auto tenants: the best of {len(together)} "
                        f"combinations, {max(together.values()):.0f} img/s in total"
                    )
                elif picks[spec.model] == solo_best:
                    reason = "fastest measured here"
                else:
                    reason = (
                        "spread: its fastest device is busy with another tenant; this maximises the total"
                    )
                choices[spec.model] = AutoChoice(
                    backend=backend,
                    device=device,
                    reason=reason,
                    candidates={f"{b}:{d}": round(f, 1) for (b, d), f in measured[spec.model].items()},
                    together=together,
                )
                spec = spec.model_copy(update={"backend": backend, "device": device})
            tenants.append(spec)
        log.info("auto placement: %s", {m: f"{c.backend}:{c.device}" for m, c in choices.items()})
        return placement.model_copy(update={"tenants": tenants}), choices

    async def _choose_together(
        self,
        autos: list[TenantSpec],
        measured: dict[str, dict[tuple[str, str], float]],
        picks: dict[str, tuple[str, str]],
    ) -> tuple[dict[str, tuple[str, str]], dict[str, float] | None]:
        """Several auto tenants compete: run the shortlisted combinations side by side and keep the
        best total. Solo figures cannot predict how runtimes share cores (measured here: two models
        spread over ONNX Runtime and OpenVINO beat both on the solo-fastest one by 12%)."""
        names = [t.model for t in autos]
        short = shortlist(measured)
        combos = list(itertools.product(*(short[n] for n in names)))
        if len(combos) > 16:
            return picks, None  # too many to measure; the even-split estimate stands
        models = {n: await asyncio.to_thread(self.repo.load, n) for n in names}
        instances = {t.model: t.instances for t in autos}
        totals: dict[str, float] = {}
        best, best_total = picks, -1.0
        for combo in combos:
            label = " + ".join(f"{n}@{b}:{d}" for n, (b, d) in zip(names, combo, strict=True))
            figures = await self._runtime_call(
                functools.partial(
                    self.profiler.measure_together,
                    [(models[n], b, d, instances[n]) for n, (b, d) in zip(names, combo, strict=True)],
                ),
                f"measuring {label} together",
            )
            totals[label] = round(sum(figures), 1)
            if sum(figures) > best_total:
                best, best_total = dict(zip(names, combo, strict=True)), sum(figures)
        return best, totals

    async def _start_tenant(self, spec: TenantSpec) -> Tenant | None:
        self.failed[spec.model] = TenantStatus(**spec.model_dump(), state="loading")
        self._mark_dirty()
        try:
            backend = registry.get(spec.backend)
            timeout = self.config.scheduler.load_timeout_s
            self._extend_start(2 * timeout)  # the availability check, then the load
            try:  # asks the runtime and its driver, which can hang on a wedged device
                ok, reason = await call_with_deadline(backend.available, timeout, None)
            except TimeoutError:
                raise BackendError(
                    f"backend {spec.backend} did not say whether it is available within {timeout:g} s"
                ) from None
            if not ok:
                raise BackendError(f"backend {spec.backend} unavailable: {reason}")
            model = await asyncio.to_thread(self.repo.load, spec.model)
            tenant = Tenant(
                spec,
                model,
                backend,
                self.emit,
                queue_depth=self.config.scheduler.queue_depth,
                overload_policy=self.config.scheduler.overload_policy,
                max_pixels=self.config.ingest.max_pixels,
                top_k=self.config.ingest.top_k,
                record=self.metrics.record,
                backend_options=self.backend_options.get(spec.backend),
            )
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
            self.failed[spec.model] = TenantStatus(**spec.model_dump(), state="failed", error=message)
            self._note_error(f"{spec.model} on {spec.backend}:{spec.device}: {message}")
            return None
        tenant.start()
        self.failed.pop(spec.model, None)
        log.info("tenant %s ready", tenant.name)
        return tenant

    def _retire(self, tenant: Tenant) -> None:
        """Drain an old tenant in the background: its queued frames are still answered."""
        self.draining.append(tenant)
        self._mark_dirty()

        async def drain() -> None:
            await asyncio.to_thread(tenant.drain, self.config.scheduler.drain_timeout_s)
            self.draining.remove(tenant)
            self._mark_dirty()
            if not self.draining:
                settle_heap()  # the retired tenant's reference cycles were frozen with it

        self._spawn(drain(), f"drain-{tenant.name}")

    def _spawn(self, coro: Any, name: str) -> None:
        """A short-lived task, forgotten once done (a daemon applies placements for months)."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _placement_file(self) -> Path:
        return self.config.state_dir / "placement.json"

    def _save_placement(self, placement: Placement) -> None:
        """Atomic write, so a crash mid-save leaves the previous placement intact."""
        path = self._placement_file()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(placement.model_dump_json(indent=2))
        os.replace(tmp, path)

    def _saved_placement(self) -> Placement | None:
        path = self._placement_file()
        if not path.is_file():
            return None
        try:
            return Placement.model_validate_json(path.read_text())
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable saved placement %s: %s", path, exc)
            return None

    # -- status and telemetry -------------------------------------------------------------------
    def _probe_capabilities(self) -> Capabilities:
        caps = {
            name: BackendCapability(available=ok, devices=devices, reason=reason)
            for name, (ok, devices, reason) in registry.capabilities().items()
        }
        return Capabilities(backends=caps, models=self.repo.names())

    def _note_error(self, message: str) -> None:
        log.warning("%s", message)
        self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}")
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        self._status_dirty.set()

    def tenant_statuses(self) -> list[TenantStatus]:
        def spec(t: Tenant) -> dict[str, Any]:
            return {**t.spec.model_dump(), "device": t.device}  # the canonical device name

        out = [
            TenantStatus(**spec(t), state=t.state, error=t.error, auto=self.auto_choices.get(t.spec.model))
            for t in self.tenants.values()
        ]
        out += [TenantStatus(**spec(t), state="draining") for t in self.draining]
        out += [s for m, s in self.failed.items()]
        return out

    def status(self) -> Status:
        return Status(
            online=True,
            device_id=self.config.device_id,
            agent_version=__version__,
            started_at=self.started_at,
            capabilities=self.capabilities,
            placement=PlacementStatus(
                generation=self.desired_generation,
                applied_generation=self.applied_generation,
                tenants=self.tenant_statuses(),
                refused=self.refused,
            ),
            errors=list(self.errors),
        )

    def _offline_payload(self) -> bytes:
        return json.dumps({"online": False, "device_id": self.config.device_id}).encode()

    async def _on_connect(self) -> None:
        self._mark_dirty()

    async def _status_loop(self) -> None:
        while True:
            await self._status_dirty.wait()
            await self.session.connected.wait()
            self._status_dirty.clear()
            with contextlib.suppress(Exception):
                await self.session.publish(
                    self.topics.status, self.status().model_dump_json().encode(), qos=1, retain=True
                )
            await asyncio.sleep(0.2)  # coalesce bursts of changes

    async def _stall_loop(self) -> None:
        """Once a second: answer batches stuck in a hung runtime call (Tenant.check_stalls), and
        publish status when a tenant's state changes because instances stalled or recovered."""
        timeout = self.config.scheduler.infer_timeout_s
        seen: dict[str, tuple[TenantState, str | None]] = {}
        while True:
            await asyncio.sleep(1.0)
            for tenant in [*self.tenants.values(), *self.draining]:
                try:
                    tenant.check_stalls(timeout)
                except Exception:  # a bug here must not stop the agent (Agent.run stops on a crash)
                    log.exception("stall check of tenant %s failed", tenant.name)
            now = {t.name: (t.state, t.error) for t in self.tenants.values()}
            for name, (_state, error) in now.items():
                if error and seen.get(name, (None, None))[1] != error:
                    self._note_error(f"{name}: {error}")  # kept in status.errors, with the time
            if now != seen:
                seen = now
                self._mark_dirty()

    def telemetry(self) -> Telemetry:
        window = self.config.metrics.telemetry_interval_s
        tenants = []
        for t in list(self.tenants.values()):
            snap = t.stats.snapshot(window)
            tenants.append(
                TenantTelemetry(
                    model=t.spec.model,
                    backend=t.spec.backend,
                    device=t.device,
                    instances=t.spec.instances,
                    state=t.state,
                    queue_depth=len(t.queue),
                    **snap,  # type: ignore[arg-type]
                )
            )
        return Telemetry(
            device_id=self.config.device_id,
            interval_s=window,
            tenants=tenants,
            device=DeviceTelemetry(
                cpu_percent=self.device_stats.cpu_percent(),
                rss_mb=self.device_stats.rss_mb(),
                temperature_c=self.device_stats.temperature_c(),
                load_1m=self.device_stats.load_1m(),
            ),
            rejected=dict(self.rejected),
        )

    async def _telemetry_loop(self) -> None:
        """Telemetry goes through the outbox: spooled while the broker is away, then sent in order."""
        while True:
            await asyncio.sleep(self.config.metrics.telemetry_interval_s)
            if self.outbox is not None:
                # QoS 1 (DESIGN.md says 0): a QoS 0 message written into a connection that has silently
                # died is lost; acknowledged delivery is what makes the spool survive a network cut.
                self.outbox.put(self.topics.telemetry, self.telemetry().model_dump_json().encode(), qos=1)

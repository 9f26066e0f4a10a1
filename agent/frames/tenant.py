"""A tenant: one model on one backend/device, with N instances each on its own worker thread.

Each instance is its own runtime session (the runtime may share weights between them). This
module owns the tenant's life and its queue: taking frames, starting, draining, its state. The
parts with one job each: loading and warm-up (tenant_load.py), the worker loop and batching
(tenant_worker.py), the signs of an unhealthy candidate (tenant_failover.py), results, errors
and metric rows (tenant_answers.py). The event loop never runs any of the blocking work.

A runtime call that never returns (a Coral stick pulled out, a wedged GPU driver) must not swallow
frames: `check_stalls` answers a batch stuck past the inference timeout, takes that instance out of
service until its call returns, and drops the late results so each frame is still answered once.

A tenant with other candidates (failover, docs/reliability.md) hands those frames on instead:
`on_unhealthy` gives it a `Relay`, and from then on its queued frames, the frames of the hung or
failed call and every new arrival go there, to be run on the next candidate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.frames import faults
from agent.frames.health import Relay
from agent.frames.ingest import Frame
from agent.frames.postprocess import detection_options
from agent.frames.preprocess import Preprocessor
from agent.frames.priority_gate import Gate, GateBoard, board
from agent.frames.scheduler import BatchQueue, QueueClosed, QueueFull
from agent.frames.slo_policy import LatencyTable
from agent.frames.tenant_answers import Answers, EmitFn, Outcome
from agent.frames.tenant_failover import FailoverSettings, FailoverWatch, UnhealthyFn
from agent.frames.tenant_load import load_instances
from agent.frames.tenant_worker import InFlight, ObjectivePlanner, Worker
from agent.observability.stats import TenantStats
from agent.protocol.schemas import Detection, ErrorCode, TenantSpec, TenantState
from agent.service.model_repo import Model
from backends.base import Backend, BackendError, ModelLoadError, Session

log = logging.getLogger(__name__)

__all__ = ["EmitFn", "FailoverSettings", "Outcome", "Tenant", "TenantOptionError", "UnhealthyFn"]


class TenantOptionError(ModelLoadError):
    """The tenant's own options do not fit its model (a detector's labels on a classifier): the
    placement's fault, not the accelerator's, so no candidate is marked unhealthy for it."""


class Tenant:
    def __init__(
        self,
        spec: TenantSpec,
        model: Model,
        backend: Backend,
        emit: EmitFn,
        *,
        queue_depth: int,
        overload_policy: Any,
        max_pixels: int,
        top_k: int = 5,
        record: Callable[[dict[str, Any]], None] | None = None,
        backend_options: dict[str, Any] | None = None,
        gates: GateBoard | None = None,
    ) -> None:
        self.spec = spec
        self.model = model
        self.backend = backend
        self.queue: BatchQueue[Frame] = BatchQueue(queue_depth, overload_policy)
        self.preprocessor = Preprocessor(model.input, max_pixels)
        self.stats = TenantStats()
        self.answers = Answers(spec, model, self.stats, emit, record, top_k)
        self.state: TenantState = "loading"
        self.error: str | None = None
        self.fault: faults.Fault | None = None  # injected on this backend and device (set at load)
        self.inflight = InFlight()
        # Measured batch times per size (objective scheduling; the drift check's like-for-like figure).
        self.latency = LatencyTable()
        self.planner = ObjectivePlanner(spec, self.latency) if spec.latency_objective_ms else None
        # Priority across the tenants on its accelerator (priority_gate.py): joined at start().
        self._gates = gates or board()
        self.gate: Gate | None = None
        self._sessions: list[Session] = []
        self._threads: list[threading.Thread] = []
        # State, the hand-off and queueing change together under _lock.
        self._lock = threading.Lock()
        self._draining = False  # drain() began: state stays draining whatever instances do
        self._drain_lock = threading.Lock()
        self._drained = False
        self._options = dict(backend_options or {})
        self._options.setdefault("threads", spec.threads)
        self._options.setdefault("instances", spec.instances)
        self._options.setdefault("precision", spec.precision)
        self._options.setdefault("max_batch", spec.batch.max_size)
        self.placed = spec  # the placement entry as asked (spec is its serving candidate)
        self.watch = FailoverWatch()
        self._handoff: Relay | None = None
        self._claim_lock = threading.Lock()  # one failover at a time (unhealthy())

    @property
    def name(self) -> str:
        return f"{self.spec.model}@{self.spec.backend}:{self.device}x{self.spec.instances}"

    @property
    def device(self) -> str:
        """Where it serves: the device name as placed until loaded, then the backend's own."""
        return self.answers.device

    @property
    def last_detections(self) -> list[Detection] | None:
        return self.answers.last_detections

    @property
    def fault_since(self) -> float | None:
        """When the fault behind its last report of an unhealthy candidate began."""
        return self.watch.fault_since

    def placed_as(self, placed: TenantSpec, failover: FailoverSettings | None = None) -> None:
        """Before start(): the placement entry it serves for (its spec is the candidate it serves
        on) and, with other candidates to move to, how it notices it should."""
        self.placed = placed
        self.watch = FailoverWatch(failover)

    # -- lifecycle (blocking: call from a worker thread) --------------------------------------
    def load(self) -> None:
        """Load and warm up every instance; on failure close what loaded and set state failed."""
        try:
            self.answers.device = device = self.backend.canonical_device(self.spec.device)
            self.fault = faults.active().find(self.spec.backend, device)
            try:
                self.answers.detect = detection_options(self.model, self.spec)
            except ValueError as exc:
                raise TenantOptionError(str(exc)) from exc
            self.answers.probabilities = load_instances(
                self._sessions,
                self.backend,
                self.model,
                self.spec,
                device,
                self._options,
                self.fault,
                self.answers.detect,
            )
        except BackendError as exc:
            self._fail(str(exc))
            raise
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise BackendError(self.error) from exc

    def abandon(self, message: str) -> None:
        """Close what a load made after the agent stopped waiting for it (see call_with_deadline)."""
        log.warning("tenant %s: %s; its sessions are closed", self.name, message)
        self._fail(message)

    def _fail(self, message: str) -> None:
        self.state, self.error = "failed", message
        for session in self._sessions:
            session.close()
        self._sessions.clear()

    def start(self) -> None:
        try:
            resource = self.backend.info.resource(self.spec.backend, self.device)
        except Exception:  # a backend without a resource declaration: no priority across tenants
            log.exception("tenant %s: its accelerator is unknown; no priority gate", self.name)
        else:
            self.gate = self._gates.gate(resource)
            if self.gate is not None:
                self.gate.join(id(self), self.spec, self.queue.__len__)
        for index, session in enumerate(self._sessions):
            worker = Worker(self, index, session)
            thread = threading.Thread(target=worker.run, name=f"{self.spec.model}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.state = "ready"

    def drain(self, timeout_s: float) -> None:
        """Stop taking frames, finish the queued ones within `timeout_s`, then close the sessions.

        Frames still queued at the deadline are answered `shutting_down`, and so is a batch whose
        runtime call has still not returned 5 s later: nothing is left unanswered.
        """
        with self._drain_lock:  # a second caller (retire, then shutdown) waits for the first
            if self._drained:
                return
            self._drain(timeout_s)
            self._drained = True

    def _drain(self, timeout_s: float) -> None:
        if self.gate is not None:  # it finishes its frames without waiting for the others'
            self.gate.leave(id(self))
        with self._lock:
            self._draining = True
            if self.state != "failed":
                self.state = "draining"
        self.queue.close()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left, relay = self.queue.take_all(), self._handoff
        if relay is not None:
            relay.put(left)
        for frame in left if relay is None else []:
            self.answers.error(frame, "shutting_down", "the tenant stopped before this frame was served")
        deadline = time.monotonic() + 5.0  # the batches in flight finish; runtimes cannot be interrupted
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        # A call that still has not returned: answer its frames now (its late results are dropped),
        # and any batch a worker is still preparing is answered instead of run (Worker._run_batch).
        self.inflight.close()
        for _, _, frames in self.inflight.abandon(lambda index, since: self._threads[index].is_alive()):
            for frame in frames:
                self.answers.error(
                    frame, "shutting_down", "the agent stopped while this frame's inference hung"
                )
        for index, session in enumerate(self._sessions):
            if self.inflight.leave_open(index, started=index < len(self._threads)):
                # Closing a session under a running call could crash the process; its worker
                # closes it if the call ever returns.
                log.error(
                    "tenant %s instance %d: left open, its runtime call never returned", self.name, index
                )
                continue
            session.close()
        self._sessions.clear()

    # -- stalls -------------------------------------------------------------------------------
    def check_stalls(self, timeout_s: float) -> None:
        """Answer the frames of any batch in the runtime for over `timeout_s` (thread-safe; the
        agent calls it every second). The instance serves again once its call returns."""
        now = time.monotonic()
        timeout_s = self.watch.stall_timeout(timeout_s)
        for index, since, frames in self.inflight.abandon(lambda _index, since: now - since > timeout_s):
            self.watch.stalled_since(since)
            relay = self.unhealthy(
                "stall", f"inference on instance {index} has not returned for {now - since:.1f} s"
            )
            self.stats.stall()
            if relay is not None:
                log.error(
                    "tenant %s instance %d: inference has not returned for %.1f s; its %d frames are "
                    "handed to the next candidate",
                    self.name,
                    index,
                    now - since,
                    len(frames),
                )
                relay.put(frames)
                continue
            log.error(
                "tenant %s instance %d: inference has not returned for %.1f s; its %d frames are answered "
                "`internal` and the instance is out of service until the call returns",
                self.name,
                index,
                now - since,
                len(frames),
            )
            for frame in frames:
                self.answers.error(
                    frame,
                    "internal",
                    f"inference on {self.name} instance {index} did not return within {timeout_s:g} s "
                    "(the accelerator may be hung)",
                )
        self.refresh_state()

    def refresh_state(self) -> None:
        """ready <-> failed as instances stall and recover; with none left, queued frames are
        answered `unavailable` at once rather than waiting for a call that may never return."""
        orphans: list[Frame] = []
        with self._lock:
            if self._draining or self.state not in ("ready", "failed") or not self._sessions:
                return
            if self._handoff is not None:  # failing over: it stays failed, its frames go elsewhere
                return
            stalled = self.inflight.stalled()
            if not stalled:
                if self.state == "failed" or self.error:
                    log.warning("tenant %s: every instance serves again", self.name)
                self.state, self.error = "ready", None
                return
            message = (
                f"instance{'s' if len(stalled) > 1 else ''} {', '.join(map(str, stalled))} of "
                f"{len(self._sessions)} stuck in inference (the runtime call has not returned)"
            )
            self.state = "failed" if len(stalled) == len(self._sessions) else "ready"
            if self.state == "failed":
                orphans = self.queue.take_all()
            self.error = message
        for frame in orphans:
            self.answers.error(frame, "unavailable", f"tenant {self.name} cannot serve: {message}")

    # -- failover -----------------------------------------------------------------------------
    def runtime_error(self, message: str) -> Relay | None:
        """A runtime call failed (a worker): after `errors_to_fail` in a row, the candidate is
        unhealthy and the relay returned takes the failed batch."""
        reason = self.watch.runtime_error(message)
        return None if reason is None else self.unhealthy("error", reason)

    def batch_served(self, per_frame_ms: float, size: int = 1) -> None:
        """A batch came back (a worker). A slow drift: the candidate still answers, so it serves
        until the next one is ready (make-before-break); reported once per tenant.

        The drift check compares like with like: a batch of `size` counts as the per-frame time it
        means at batch 1 (larger batches cost less per frame), from the measured batch times."""
        one, this = self.latency.per_frame(1), self.latency.per_frame(size)
        if size > 1 and one and this:
            per_frame_ms *= one / this
        reason = self.watch.served(per_frame_ms)
        settings = self.watch.settings
        if reason is not None and settings is not None and not self.handing_off:
            settings.on_unhealthy(self, "drift", reason)

    def unhealthy(self, kind: str, message: str) -> Relay | None:
        """This candidate cannot serve (a stall, errors): with another candidate to move to, every
        frame it holds or gets from now on goes to the relay returned (thread-safe)."""
        # One failover per tenant: instances failing together wait for the first one's relay
        # instead of starting a second failover (and counting the device's failure twice).
        with self._claim_lock:
            settings = self.watch.settings
            with self._lock:
                if self._handoff is not None or settings is None or self._draining:
                    return self._handoff
            relay = settings.on_unhealthy(self, kind, message)
            if relay is None:
                return None
            with self._lock:
                self._handoff = relay
                self.state, self.error = "failed", f"{kind}: {message}; moving to the next candidate"
                left = self.queue.take_all()
        relay.put(left)
        return relay

    @property
    def handing_off(self) -> bool:
        return self._handoff is not None

    # -- frames -------------------------------------------------------------------------------
    def submit(self, frame: Frame) -> None:
        """Queue a frame routed here; every frame gets exactly one outcome, now or later."""
        self.stats.frame_in()
        self._take(frame)

    def submit_many(self, frames: list[Frame]) -> None:
        """Queue frames that belong together (a cascade's crops) in one step, so that a free
        instance takes them as one batch; each still gets exactly one outcome."""
        for _ in frames:
            self.stats.frame_in()
        dropped: list[Frame] = []
        refused: list[Frame] = []
        with self._lock:
            relay, failed = self._handoff, self.state == "failed"
            if relay is None and not failed:
                try:
                    dropped, refused = self.queue.put_many(frames)
                except QueueClosed:
                    relay, failed = None, True
        if relay is not None:
            relay.put(frames)
            return
        if failed:
            for frame in frames:
                self.answers.error(frame, "unavailable", f"tenant {self.name} is not taking frames")
            return
        for frame in dropped:
            self.stats.dropped()
            self.answers.error(
                frame, "overloaded", f"dropped as the oldest of {self.queue.depth} queued frames"
            )
        for frame in refused:
            self.stats.dropped()
            self.answers.error(frame, "overloaded", f"queue full ({self.queue.depth} frames); frame refused")

    def take_over(self, frame: Frame) -> None:
        """A frame relayed from the tenant this one replaces (failover): already counted in there."""
        self._take(frame)

    def _take(self, frame: Frame) -> None:
        with self._lock:
            relay = self._handoff
        if relay is not None:
            relay.put([frame])
            return
        if self.state == "failed":
            self.answers.error(frame, "unavailable", f"tenant {self.name} cannot serve: {self.error}")
            return
        try:
            with self._lock:  # not queued behind a hand-off that already emptied the queue
                relay = self._handoff
                dropped = self.queue.put(frame) if relay is None else None
            if relay is not None:
                relay.put([frame])
                return
        except QueueFull:
            self.stats.dropped()
            self.answers.error(frame, "overloaded", f"queue full ({self.queue.depth} frames); frame refused")
            return
        except QueueClosed:
            self.answers.error(frame, "unavailable", f"tenant {self.name} is not taking frames")
            return
        if dropped is not None:
            self.stats.dropped()
            self.answers.error(
                dropped, "overloaded", f"dropped as the oldest of {self.queue.depth} queued frames"
            )

    def reject(self, frame: Frame, code: ErrorCode, message: str) -> None:
        """Answer `frame` with an error on this tenant's account (a relay that cannot move it)."""
        self.answers.error(frame, code, message)

"""A tenant: one model on one backend/device, with N instances each on its own worker thread.

Each instance is its own runtime session (the runtime may share weights between them). Worker
threads take batches from the tenant's queue, decode and preprocess the frames, run the batch,
and hand every frame exactly one outcome through `emit`. The event loop never runs any of this.

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

import numpy as np

from agent.frames import faults
from agent.frames.health import DriftWatch, Relay
from agent.frames.ingest import Frame
from agent.frames.postprocess import (
    DetectionOptions,
    detection_options,
    detections,
    outputs_probabilities,
    top_k,
)
from agent.frames.preprocess import BadImage, Preprocessor
from agent.frames.scheduler import BatchQueue, QueueClosed, QueueFull, warmup_batch_sizes
from agent.observability.stats import TenantStats
from agent.protocol.schemas import (
    Detection,
    DetectionResult,
    ErrorCode,
    ErrorInfo,
    ErrorResult,
    InferResult,
    TenantRef,
    TenantSpec,
    TenantState,
    Timing,
)
from agent.service.model_repo import Model
from backends import isolation
from backends.base import Backend, BackendError, ModelLoadError, Session

log = logging.getLogger(__name__)


class TenantOptionError(ModelLoadError):
    """The tenant's own options do not fit its model (a detector's labels on a classifier): the
    placement's fault, not the accelerator's, so no candidate is marked unhealthy for it."""


Outcome = InferResult | DetectionResult | ErrorResult
EmitFn = Callable[[Frame, Outcome], None]
# (tenant, kind: "stall" | "error" | "drift", why) -> where its frames go now, or None (no failover)
UnhealthyFn = Callable[["Tenant", str, str], Relay | None]


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
    ) -> None:
        self.spec = spec
        self.model = model
        self.backend = backend
        self.device = spec.device
        self._emit = emit
        self._record = record
        self._top_k = top_k
        self.queue: BatchQueue[Frame] = BatchQueue(queue_depth, overload_policy)
        self.preprocessor = Preprocessor(model.input, max_pixels)
        self.stats = TenantStats()
        self.state: TenantState = "loading"
        self.error: str | None = None
        self._sessions: list[Session] = []
        self._threads: list[threading.Thread] = []
        # Stall tracking, under _lock: the batch each instance has in the runtime (since when), and
        # the instances whose batch was already answered because the runtime call did not return.
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[float, list[Frame]]] = {}
        self._stalled: set[int] = set()
        self._draining = False  # drain() began: state stays draining whatever instances do
        self._closed = False  # drain() gave up waiting: a batch not yet in the runtime is not run
        self._drain_lock = threading.Lock()
        self._probabilities: bool | None = None  # the model outputs probabilities, not logits
        self._detect: DetectionOptions | None = None  # a detector's options (set at load)
        self.last_detections: list[Detection] | None = None  # the last frame's boxes (telemetry)
        self._drained = False
        self._options = dict(backend_options or {})
        self._options.setdefault("threads", spec.threads)
        self._options.setdefault("instances", spec.instances)
        self._options.setdefault("precision", spec.precision)
        self._options.setdefault("max_batch", spec.batch.max_size)
        # Failover (set by the reconciler for tenants with several candidates).
        self.placed = spec  # the placement entry as asked (spec is its serving candidate)
        self.on_unhealthy: UnhealthyFn | None = None
        self.errors_to_fail = 0  # runtime errors in a row that make the candidate unhealthy; 0: never
        self.stall_timeout_s: float | None = None  # a shorter stall deadline where it can move
        self.fault_since: float | None = None  # when the fault behind the last unhealthy() began
        self.drift: DriftWatch | None = None
        self._handoff: Relay | None = None
        self._claim_lock = threading.Lock()  # one failover at a time (unhealthy())
        self._exited: set[int] = set()  # instances whose worker has returned (under _lock)
        self._left_open: set[int] = set()  # sessions drain could not close: their worker will
        self._errors_in_row = 0
        self._fault: faults.Fault | None = None

    @property
    def name(self) -> str:
        return f"{self.spec.model}@{self.spec.backend}:{self.device}x{self.spec.instances}"

    # -- lifecycle (blocking: call from a worker thread) --------------------------------------
    def load(self) -> None:
        """Load and warm up every instance; on failure close what loaded and set state failed."""
        try:
            self.device = self.backend.canonical_device(self.spec.device)
            self._fault = faults.active().find(self.spec.backend, self.device)
            try:
                self._detect = detection_options(self.model, self.spec)
            except ValueError as exc:
                raise TenantOptionError(str(exc)) from exc
            h, w = self.model.input.size
            item = (3, h, w) if self.model.input.layout == "NCHW" else (h, w, 3)
            for _ in range(self.spec.instances):
                session = isolation.load(self.backend, self.model.artifacts, self.device, self._options)
                self._sessions.append(session)
                # The first run at each batch size compiles kernels or re-plans memory (OpenVINO's
                # dynamic shapes: ~100 ms of stalled frames measured). Do it now, not on frames.
                for size in warmup_batch_sizes(self.spec.batch.max_size):
                    try:
                        if self._fault is not None:
                            self._fault.inject(0)
                        out = session.infer(np.zeros((size, *item), np.dtype(self.model.input.dtype)))
                    except BackendError as exc:
                        raise ModelLoadError(
                            f"warm-up at batch {size} failed: {exc} (check [input] size, layout and dtype "
                            "in model.toml, and the tenant's batch.max_size, against the model)"
                        ) from exc
                    self._check_output(np.asarray(out), size)
        except BackendError as exc:
            self._fail(str(exc))
            raise
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise BackendError(self.error) from exc

    def _check_output(self, out: np.ndarray, size: int) -> None:
        """A classifier answers (batch, classes), one class per label: refused at load, not
        discovered frame by frame. Trailing 1-sized dimensions (N, C, 1, 1) are accepted.
        A detector answers (batch, boxes, 6): x1, y1, x2, y2, score, class (docs/detection.md)."""
        if self._detect is not None:
            if out.ndim != 3 or out.shape[0] != size or out.shape[2] != 6:
                raise ModelLoadError(
                    f"the model answers a batch of {size} with shape {tuple(out.shape)}; a detector with "
                    "decoder xyxy_score_class must output (batch, boxes, 6)"
                )
            return
        if out.ndim < 2 or out.shape[0] != size or any(d != 1 for d in out.shape[2:]):
            raise ModelLoadError(
                f"the model answers a batch of {size} with shape {tuple(out.shape)}; "
                "a classifier must output (batch, classes)"
            )
        if self._probabilities is None:
            self._probabilities = outputs_probabilities(out)
        labels = len(self.model.labels)
        if labels and out.shape[1] != labels:
            raise ModelLoadError(
                f"the model outputs {out.shape[1]} classes but {self.model.manifest.labels} has {labels} "
                "labels: one label per class, in output order"
            )

    def _remember(self, found: list[Detection]) -> list[Detection]:
        self.last_detections = found
        return found

    def _result(
        self, frame: Frame, ref: TenantRef, row: np.ndarray, size: tuple[int, int], timing: Timing, batch: int
    ) -> InferResult | DetectionResult:
        if self._detect is not None:
            return DetectionResult(
                request_id=frame.request_id,
                model=frame.model,
                tenant=ref,
                detections=self._remember(detections(self.model, row, size, self._detect)),
                timing_ms=timing,
                batch_size=batch,
            )
        return InferResult(
            request_id=frame.request_id,
            model=frame.model,
            tenant=ref,
            top=top_k(row, self.model.labels, self._top_k, bool(self._probabilities)),
            timing_ms=timing,
            batch_size=batch,
        )

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
        for index, session in enumerate(self._sessions):
            thread = threading.Thread(
                target=self._worker, args=(index, session), name=f"{self.spec.model}-{index}", daemon=True
            )
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
            self._error(frame, "shutting_down", "the tenant stopped before this frame was served")
        deadline = time.monotonic() + 5.0  # the batches in flight finish; runtimes cannot be interrupted
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        # A call that still has not returned: answer its frames now (its late results are dropped),
        # and any batch a worker is still preparing is answered instead of run (_run_batch).
        with self._lock:
            self._closed = True
        for _, _, frames in self._abandon(lambda index, since: self._threads[index].is_alive()):
            for frame in frames:
                self._error(frame, "shutting_down", "the agent stopped while this frame's inference hung")
        for index, session in enumerate(self._sessions):
            with self._lock:
                running = index < len(self._threads) and index not in self._exited
                if running:
                    self._left_open.add(index)  # its worker closes it if the call ever returns
            if running:
                # Closing a session under a running call could crash the process.
                log.error(
                    "tenant %s instance %d: left open, its runtime call never returned", self.name, index
                )
                continue
            session.close()
        self._sessions.clear()

    # -- stalls -------------------------------------------------------------------------------
    def _abandon(self, stuck: Callable[[int, float], bool]) -> list[tuple[int, float, list[Frame]]]:
        """Mark the in-flight batches `stuck(index, since)` selects as answered elsewhere."""
        with self._lock:
            found = [
                (index, since, frames)
                for index, (since, frames) in self._inflight.items()
                if index not in self._stalled and stuck(index, since)
            ]
            self._stalled.update(index for index, _, _ in found)
        return found

    def check_stalls(self, timeout_s: float) -> None:
        """Answer the frames of any batch in the runtime for over `timeout_s` (thread-safe; the
        agent calls it every second). The instance serves again once its call returns."""
        now = time.monotonic()
        if self.stall_timeout_s is not None:
            timeout_s = min(timeout_s, self.stall_timeout_s)
        for index, since, frames in self._abandon(lambda _index, since: now - since > timeout_s):
            self.fault_since = since  # the hung call began then
            relay = self.unhealthy(
                "stall", f"inference on instance {index} has not returned for {now - since:.1f} s"
            )
            if relay is not None:
                log.error(
                    "tenant %s instance %d: inference has not returned for %.1f s; its %d frames are "
                    "handed to the next candidate",
                    self.name,
                    index,
                    now - since,
                    len(frames),
                )
                self.stats.stall()
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
            self.stats.stall()
            for frame in frames:
                self._error(
                    frame,
                    "internal",
                    f"inference on {self.name} instance {index} did not return within {timeout_s:g} s "
                    "(the accelerator may be hung)",
                )
        self._refresh_state()

    def _refresh_state(self) -> None:
        """ready <-> failed as instances stall and recover; with none left, queued frames are
        answered `unavailable` at once rather than waiting for a call that may never return."""
        orphans: list[Frame] = []
        with self._lock:
            if self._draining or self.state not in ("ready", "failed") or not self._sessions:
                return
            if self._handoff is not None:  # failing over: it stays failed, its frames go elsewhere
                return
            stalled = sorted(self._stalled)
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
            self._error(frame, "unavailable", f"tenant {self.name} cannot serve: {message}")

    # -- frames -------------------------------------------------------------------------------
    def unhealthy(self, kind: str, message: str) -> Relay | None:
        """This candidate cannot serve (a stall, errors): with another candidate to move to, every
        frame it holds or gets from now on goes to the relay returned (thread-safe)."""
        # One failover per tenant: instances failing together wait for the first one's relay
        # instead of starting a second failover (and counting the device's failure twice).
        with self._claim_lock:
            with self._lock:
                if self._handoff is not None or self.on_unhealthy is None or self._draining:
                    return self._handoff
            relay = self.on_unhealthy(self, kind, message)
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

    def submit(self, frame: Frame) -> None:
        """Queue a frame; every frame gets exactly one outcome, now or later."""
        self.stats.frame_in()
        with self._lock:
            relay = self._handoff
        if relay is not None:
            relay.put([frame])
            return
        if self.state == "failed":
            self._error(frame, "unavailable", f"tenant {self.name} cannot serve: {self.error}")
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
            self._error(frame, "overloaded", f"queue full ({self.queue.depth} frames); frame refused")
            return
        except QueueClosed:
            self._error(frame, "unavailable", f"tenant {self.name} is not taking frames")
            return
        if dropped is not None:
            self.stats.dropped()
            self._error(dropped, "overloaded", f"dropped as the oldest of {self.queue.depth} queued frames")

    def reject(self, frame: Frame, code: ErrorCode, message: str) -> None:
        """Answer `frame` with an error on this tenant's account (a relay that cannot move it)."""
        self._error(frame, code, message)

    def _error(self, frame: Frame, code: ErrorCode, message: str) -> None:
        self.stats.error()
        self._emit(
            frame,
            ErrorResult(
                request_id=frame.request_id, model=frame.model, error=ErrorInfo(code=code, message=message)
            ),
        )
        if self._record:
            self._record(self._row(frame, code, instance=None, timing=None))

    def _row(self, frame: Frame, status: str, instance: int | None, timing: Timing | None) -> dict[str, Any]:
        return {
            "ts": time.time(),
            "request_id": frame.request_id,
            "model": frame.model,
            "backend": self.spec.backend,
            "device": self.device,
            "instance": instance,
            "queue_ms": timing.queue if timing else None,
            "preprocess_ms": timing.preprocess if timing else None,
            "infer_ms": timing.infer if timing else None,
            "total_ms": timing.total if timing else None,
            "status": status,
        }

    def _runtime_error(self, message: str) -> Relay | None:
        """A runtime call failed: after `errors_to_fail` in a row, the candidate is unhealthy."""
        with self._lock:
            self._errors_in_row += 1
            if self._errors_in_row == 1:
                self.fault_since = time.monotonic()
            enough = 0 < self.errors_to_fail <= self._errors_in_row
        if not enough:
            return None
        return self.unhealthy("error", f"{self.errors_to_fail} runtime errors in a row, the last: {message}")

    def _slow(self, recent_ms: float) -> None:
        """A slow drift: the candidate still answers, so it serves until the next one is ready
        (make-before-break); reported once per tenant."""
        drift = self.drift
        baseline = drift.baseline_ms if drift is not None else None
        if self.on_unhealthy is not None and baseline is not None and not self.handing_off:
            self.drift = None
            self.on_unhealthy(
                self,
                "drift",
                f"inference {recent_ms:.1f} ms per frame against a baseline of {baseline:.1f} ms",
            )

    def _worker(self, index: int, session: Session) -> None:
        spec = self.spec
        h, w = self.model.input.size
        item_shape = (3, h, w) if self.model.input.layout == "NCHW" else (h, w, 3)
        buffer = np.empty((spec.batch.max_size, *item_shape), np.dtype(self.model.input.dtype))
        ref = TenantRef(backend=spec.backend, device=self.device, instance=index)
        max_delay_s = spec.batch.max_delay_ms / 1000.0
        while True:
            batch = self.queue.get_batch(spec.batch.max_size, max_delay_s)
            if batch is None:
                with self._lock:
                    self._exited.add(index)
                    late = index in self._left_open
                if late:  # the call that hung returned after the tenant was retired: free it now
                    session.close()
                    log.warning(
                        "tenant %s instance %d: its late call returned; session closed", self.name, index
                    )
                return
            settled: set[int] = set()  # id() of the frames of this batch already answered
            try:
                self._run_batch(batch, session, buffer, ref, index, settled)
            except Exception:  # a bug must not kill the instance nor lose (or re-answer) frames
                log.exception("tenant %s instance %d: batch failed", self.name, index)
                for frame in batch:
                    if id(frame) not in settled:
                        self._error(frame, "internal", "internal error while serving this frame")

    def _run_batch(
        self,
        batch: list[Frame],
        session: Session,
        buffer: np.ndarray,
        ref: TenantRef,
        index: int,
        settled: set[int],
    ) -> None:
        def fail(frames: list[Frame], code: ErrorCode, message: str) -> None:
            for frame in frames:
                settled.add(id(frame))
                self._error(frame, code, message)

        started = time.monotonic()
        ready: list[Frame] = []
        sizes: list[tuple[int, int]] = []  # each frame's (width, height), for boxes
        for frame in batch:
            if frame.expires_at is not None and started > frame.expires_at:
                fail([frame], "expired", "message expiry passed before inference")
                continue
            try:
                sizes.append(self.preprocessor.prepare(frame.image, out=buffer[len(ready)])[1])
            except BadImage as exc:
                fail([frame], "bad_image", str(exc))
                continue
            ready.append(frame)
        if not ready:
            return
        preprocessed = time.monotonic()
        with self._lock:
            closed = self._closed
            if not closed:
                self._inflight[index] = (preprocessed, ready)
        if closed:  # drain() stopped waiting for this instance: do not start a call now
            fail(ready, "shutting_down", "the tenant stopped before this frame was served")
            return
        failure: str | None = None
        try:
            if self._fault is not None:
                self._fault.inject(len(ready))
            logits = session.infer(buffer[: len(ready)])
        except BackendError as exc:
            failure = str(exc)
        except Exception as exc:  # a runtime bug: these frames are still answered once, below
            log.exception("tenant %s instance %d: inference raised", self.name, index)
            failure = f"inference failed: {type(exc).__name__}: {exc}"
        done = time.monotonic()
        with self._lock:
            del self._inflight[index]
            abandoned = index in self._stalled
            self._stalled.discard(index)
        if abandoned:  # check_stalls or drain answered these frames while the call hung
            settled.update(id(frame) for frame in ready)
            log.warning(
                "tenant %s instance %d: inference returned after %.1f s; its %d frames were already "
                "answered, the instance serves again",
                self.name,
                index,
                done - preprocessed,
                len(ready),
            )
            self._refresh_state()
            return
        if failure is not None:
            relay = self._runtime_error(failure)
            if relay is not None:  # failing over: these frames run on the next candidate
                settled.update(id(frame) for frame in ready)
                relay.put(ready)
                return
            fail(ready, "internal", failure)
            return
        with self._lock:
            self._errors_in_row = 0
        drift = self.drift  # another worker may clear it (a drift reported) meanwhile
        if drift is not None:
            drifted = drift.add((done - preprocessed) * 1000.0 / len(ready))
            if drifted is not None:
                self._slow(drifted)
        if len(logits) != len(ready):
            fail(ready, "internal", f"the runtime returned {len(logits)} results for {len(ready)} frames")
            return
        logits = np.asarray(logits).reshape(len(ready), -1)  # (N, C, 1, 1) heads, checked at load
        self.stats.batch(len(ready))
        per_frame_pre = (preprocessed - started) * 1000.0 / len(ready)
        infer_ms = (done - preprocessed) * 1000.0
        for frame, row, size in zip(ready, logits, sizes, strict=True):
            timing = Timing(
                queue=round((started - frame.received) * 1000.0, 3),
                preprocess=round(per_frame_pre, 3),
                infer=round(infer_ms, 3),
                total=round((time.monotonic() - frame.received) * 1000.0, 3),
            )
            result = self._result(frame, ref, row, size, timing, len(ready))
            self.stats.served(timing.total, timing.queue, timing.preprocess, timing.infer)
            self._emit(frame, result)
            settled.add(id(frame))
            if self._record:
                self._record(self._row(frame, "ok", index, timing))

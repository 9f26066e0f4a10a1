"""A tenant's workers: one thread per instance takes batches from the queue, decodes and
preprocesses them, runs the runtime and hands every frame exactly one outcome.

`InFlight` tracks the batch each instance has in the runtime, so that a call that never returns
(a Coral stick pulled out, a wedged GPU driver) can be answered by someone else (a stall check,
the drain) and its late results dropped: each frame is still answered once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from agent.frames.ingest import Frame
from agent.frames.preprocess import BadImage
from agent.frames.priority_gate import Gate, wait_for_slots, yield_cores
from agent.frames.slo_policy import PRIORITIES, Item, LatencyTable, plan
from agent.frames.tenant_load import item_shape
from agent.protocol.schemas import ErrorCode, TenantRef, TenantSpec, Timing
from backends.base import BackendError, Session

if TYPE_CHECKING:
    from agent.frames.tenant import Tenant

log = logging.getLogger(__name__)


class InFlight:
    """Which instance has which batch in the runtime since when, and which of those batches were
    already answered elsewhere (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, tuple[float, list[Frame]]] = {}
        self._stalled: set[int] = set()  # their batch was answered: the call did not return
        self._closed = False  # the drain gave up waiting: a batch not yet in the runtime is not run
        self._exited: set[int] = set()  # instances whose worker has returned
        self._left_open: set[int] = set()  # sessions the drain could not close: their worker will

    def begin(self, index: int, since: float, frames: list[Frame]) -> bool:
        """The batch goes into the runtime; False once closed (answer it instead)."""
        with self._lock:
            if self._closed:
                return False
            self._running[index] = (since, frames)
            return True

    def end(self, index: int) -> bool:
        """The call returned; True when its frames were already answered (drop its results)."""
        with self._lock:
            del self._running[index]
            abandoned = index in self._stalled
            self._stalled.discard(index)
            return abandoned

    def abandon(self, stuck: Callable[[int, float], bool]) -> list[tuple[int, float, list[Frame]]]:
        """Mark the batches `stuck(index, since)` selects as answered elsewhere; returns them."""
        with self._lock:
            found = [
                (index, since, frames)
                for index, (since, frames) in self._running.items()
                if index not in self._stalled and stuck(index, since)
            ]
            self._stalled.update(index for index, _, _ in found)
        return found

    def stalled(self) -> list[int]:
        with self._lock:
            return sorted(self._stalled)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def leave_open(self, index: int, started: bool) -> bool:
        """At the drain: True if instance `index` (started) is still running, its session then to be
        closed by its worker when the call returns."""
        with self._lock:
            running = started and index not in self._exited
            if running:
                self._left_open.add(index)
            return running

    def exit(self, index: int) -> bool:
        """The worker returns; True when it must close its session (the drain left it open)."""
        with self._lock:
            self._exited.add(index)
            return index in self._left_open


class ObjectivePlanner:
    """Asks the objective policy (slo_policy.py) for a tenant's next batch: each frame's deadline is
    its arrival plus the objective, or its MQTT 5 expiry if sooner."""

    def __init__(self, spec: TenantSpec, table: LatencyTable) -> None:
        self.objective_s = (spec.latency_objective_ms or 0.0) / 1000.0
        self.priority = PRIORITIES[spec.priority]
        self.max_size = spec.batch.max_size
        self.servers = spec.instances
        self.table = table
        # Nothing taken for this long: run one frame the estimate would shed (slo_policy.plan).
        self.explore_after_s = max(1.0, 2.0 * self.objective_s)
        self.last_taken = time.monotonic()

    def deadline(self, frame: Frame) -> float:
        own = frame.received + self.objective_s
        return own if frame.expires_at is None else min(own, frame.expires_at)

    def choose(self, frames: list[Frame]) -> tuple[list[int], list[int]]:
        now = time.monotonic()
        items = [Item(f.received, self.deadline(f), self.priority) for f in frames]
        explore = now - self.last_taken > self.explore_after_s
        decision = plan(items, now, self.max_size, self.table.estimate, self.servers, explore)
        if decision.take:
            self.last_taken = now
        return decision.take, decision.shed


class Worker:
    """One instance's loop on its own thread, serving `tenant`'s queue with `session`."""

    def __init__(self, tenant: Tenant, index: int, session: Session) -> None:
        self.tenant = tenant
        self.index = index
        self.session = session
        spec, model = tenant.spec, tenant.model
        self.buffer = np.empty((spec.batch.max_size, *item_shape(model)), np.dtype(model.input.dtype))
        self.ref = TenantRef(backend=spec.backend, device=tenant.device, instance=index)

    def run(self) -> None:
        t = self.tenant
        max_delay_s = t.spec.batch.max_delay_ms / 1000.0
        planner = t.planner
        if t.gate is not None:
            yield_cores(t.gate, t.spec)
        while True:
            if planner is None:
                batch = t.queue.get_batch(t.spec.batch.max_size, max_delay_s)
            else:
                planned = t.queue.get_planned(planner.choose, t.spec.batch.max_size, max_delay_s)
                batch = None if planned is None else planned[0]
                for frame in [] if planned is None else planned[1]:
                    t.answers.shed(frame, planner.objective_s * 1000.0)
                if batch == []:
                    continue
            if batch is None:
                if t.inflight.exit(self.index):  # the call that hung returned after the drain: free it
                    self.session.close()
                    log.warning(
                        "tenant %s instance %d: its late call returned; session closed", t.name, self.index
                    )
                return
            gate = t.gate if t.gate is not None and t.gate.active else None
            if gate is not None:  # tenants of several priorities share its accelerator
                batch = self._wait_turn(gate, batch)
                if not batch:
                    continue
            settled: set[int] = set()  # id() of the frames of this batch already answered
            try:
                self._run_batch(batch, settled)
            except Exception:  # a bug must not kill the instance nor lose (or re-answer) frames
                log.exception("tenant %s instance %d: batch failed", t.name, self.index)
                for frame in batch:
                    if id(frame) not in settled:
                        t.answers.error(frame, "internal", "internal error while serving this frame")
            finally:
                if gate is not None:
                    gate.release(id(t))

    def _wait_turn(self, gate: Gate, batch: list[Frame]) -> list[Frame]:
        """Wait for the run slots of its accelerator (priority_gate.py); what is left to run."""
        t, planner = self.tenant, self.tenant.planner
        one_ms = t.latency.estimate(1) or 0.0
        objective_ms = 0.0 if planner is None else planner.objective_s * 1000.0
        return wait_for_slots(
            gate,
            id(t),
            batch,
            (lambda f: None) if planner is None else planner.deadline,
            one_ms / 1000.0,
            lambda f: t.answers.shed(f, objective_ms),
        )

    def _prepare(self, frame: Frame, out: np.ndarray) -> tuple[int, int]:
        """Decode and preprocess into `out`; returns the frame's (width, height). A frame a cascade
        follows keeps its full-resolution decode for the crops (decoded once); a crop comes decoded."""
        pre = self.tenant.preprocessor
        if frame.pixels is None and frame.keep_pixels:
            frame.pixels = pre.decode(frame.image, full=True)
        if frame.pixels is not None:
            return pre.prepare_pixels(frame.pixels, out)
        return pre.prepare(frame.image, out=out)[1]

    def _run_batch(self, batch: list[Frame], settled: set[int]) -> None:
        t, index = self.tenant, self.index

        def fail(frames: list[Frame], code: ErrorCode, message: str) -> None:
            for frame in frames:
                settled.add(id(frame))
                t.answers.error(frame, code, message)

        started = time.monotonic()
        ready: list[Frame] = []
        sizes: list[tuple[int, int]] = []  # each frame's (width, height), for boxes
        for frame in batch:
            if frame.expires_at is not None and started > frame.expires_at:
                fail([frame], "expired", "message expiry passed before inference")
                continue
            try:
                sizes.append(self._prepare(frame, self.buffer[len(ready)]))
            except BadImage as exc:
                fail([frame], "bad_image", str(exc))
                continue
            ready.append(frame)
        if not ready:
            return
        preprocessed = time.monotonic()
        if not t.inflight.begin(index, preprocessed, ready):  # the drain stopped waiting for it
            fail(ready, "shutting_down", "the tenant stopped before this frame was served")
            return
        failure: str | None = None
        try:
            if t.fault is not None:
                t.fault.inject(len(ready))
            logits = self.session.infer(self.buffer[: len(ready)])
        except BackendError as exc:
            failure = str(exc)
        except Exception as exc:  # a runtime bug: these frames are still answered once, below
            log.exception("tenant %s instance %d: inference raised", t.name, index)
            failure = f"inference failed: {type(exc).__name__}: {exc}"
        done = time.monotonic()
        if t.inflight.end(index):  # check_stalls or drain answered these frames while the call hung
            settled.update(id(frame) for frame in ready)
            log.warning(
                "tenant %s instance %d: inference returned after %.1f s; its %d frames were already "
                "answered, the instance serves again",
                t.name,
                index,
                done - preprocessed,
                len(ready),
            )
            t.refresh_state()
            return
        if failure is not None:
            relay = t.runtime_error(failure)
            if relay is not None:  # failing over: these frames run on the next candidate
                settled.update(id(frame) for frame in ready)
                relay.put(ready)
                return
            fail(ready, "internal", failure)
            return
        t.batch_served((done - preprocessed) * 1000.0 / len(ready), len(ready))
        t.latency.update(len(ready), (done - started) * 1000.0)
        if len(logits) != len(ready):
            fail(ready, "internal", f"the runtime returned {len(logits)} results for {len(ready)} frames")
            return
        logits = np.asarray(logits)
        if t.answers.detect is None:
            logits = logits.reshape(len(ready), -1)  # (N, C, 1, 1) heads, checked at load
        t.stats.batch(len(ready))
        per_frame_pre = (preprocessed - started) * 1000.0 / len(ready)
        infer_ms = (done - preprocessed) * 1000.0
        for frame, row, size in zip(ready, logits, sizes, strict=True):
            timing = Timing(
                queue=round((started - frame.received) * 1000.0, 3),
                preprocess=round(per_frame_pre, 3),
                infer=round(infer_ms, 3),
                total=round((time.monotonic() - frame.received) * 1000.0, 3),
            )
            t.answers.served(frame, self.ref, row, size, timing, len(ready))
            settled.add(id(frame))

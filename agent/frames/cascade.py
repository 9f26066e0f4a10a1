"""Cascades: a classifier tenant run on a detector tenant's boxes, one answer per frame.

The router marks a frame whose model a classifier follows (`Frame.keep_pixels`): the detector's
worker then decodes it once at full resolution and keeps that decode. When the detector's answer
reaches the router, `Cascades.start` cuts the chosen boxes out of the full-resolution frame (not
the detector's shrunken input: a 130-px dog is 100 px there) and queues them on the classifier
tenant in one step, as frames of their own with the frame's deadline and an answer hook. The
classifier batches them (crops of one frame, and of frames arriving together), fails over and
counts them like any frame. The frame's one answer goes out when its last crop is answered, or at
its deadline with the boxes not yet classified left without `classes`, marked `timed_out`
(docs/detection.md "Cascades", docs/protocol.md "Cascades").
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.frames.ingest import Frame
from agent.protocol.schemas import (
    Box,
    CascadeReport,
    CascadeSpec,
    Detection,
    DetectionResult,
    ErrorResult,
    InferResult,
    TopK,
)

if TYPE_CHECKING:
    from agent.frames.tenant_table import TenantTable

log = logging.getLogger(__name__)

SendFn = Callable[[Frame, Any], None]


def chosen_boxes(detections: list[Detection], spec: CascadeSpec, width: int, height: int) -> list[int]:
    """Which detections are classified: of the wanted labels, with a smaller side of at least
    `min_box_px` pixels of the original frame, the best `max_crops` (detections come best first)."""
    wanted = None if spec.labels is None else {label.lower() for label in spec.labels}
    chosen: list[int] = []
    for index, found in enumerate(detections):
        if wanted is not None and found.label.lower() not in wanted:
            continue
        box = found.box
        side = min((box.x_max - box.x_min) * width, (box.y_max - box.y_min) * height)
        if side < spec.min_box_px:
            continue
        chosen.append(index)
        if len(chosen) == spec.max_crops:
            break
    return chosen


def crop(pixels: np.ndarray, box: Box, margin: float) -> np.ndarray:
    """The box, grown by `margin` of its size on each side, cut from the (H, W, 3) frame."""
    height, width = pixels.shape[:2]
    grow_x = (box.x_max - box.x_min) * width * margin
    grow_y = (box.y_max - box.y_min) * height * margin
    x0 = max(0, math.floor(box.x_min * width - grow_x))
    y0 = max(0, math.floor(box.y_min * height - grow_y))
    x1 = min(width, max(x0 + 1, math.ceil(box.x_max * width + grow_x)))
    y1 = min(height, max(y0 + 1, math.ceil(box.y_max * height + grow_y)))
    # A copy: the crop outlives the frame's decode, which is freed once the frame is answered.
    return np.ascontiguousarray(pixels[y0:y1, x0:x1])


class Deadlines:
    """One thread that calls each registered function at its time (a cascade's deadline): one
    timer thread per frame would cost a thread start per frame."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cond = threading.Condition()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, when: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._order), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cascade-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # a bug in one frame's answer must not stop the others' deadlines
                log.exception("cascade deadline failed")


class Job:
    """One frame's cascade: its detections, the crops in flight, and its one answer (thread-safe:
    crop answers come from classifier workers, the deadline from the timer thread)."""

    def __init__(
        self, frame: Frame, result: DetectionResult, model: str, spec: CascadeSpec, send: SendFn
    ) -> None:
        self.frame, self.result, self.model, self.spec = frame, result, model, spec
        self._send = send
        self._lock = threading.Lock()
        self._done = False
        self._pending = 0
        self._crops = 0
        self._classes: dict[int, list[TopK]] = {}
        self._failures: list[str] = []
        self._expired = 0
        self.started = time.monotonic()

    def expect(self, crops: int) -> None:
        self._pending = self._crops = crops

    def answer(self, index: int, outcome: InferResult | ErrorResult) -> None:
        """A crop's outcome (detection `index`); the last one sends the frame's answer."""
        with self._lock:
            if self._done:
                return  # the deadline already sent the frame's answer
            if isinstance(outcome, InferResult):
                self._classes[index] = outcome.top[: self.spec.top_k]
            else:
                self._failures.append(f"box {index}: {outcome.error.code}: {outcome.error.message}")
                self._expired += outcome.error.code == "expired"
            self._pending -= 1
            if self._pending > 0:
                return
            self._done = True
        # Crops the classifier found expired ran into the frame's deadline, as the timer would have.
        status = "timed_out" if self._expired else "partial" if self._failures else "complete"
        self.finish(status, "; ".join(self._failures[:3]) or None)

    def expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            left = self._pending
        self.finish(
            "timed_out", f"the frame's deadline passed with {left} of {self._crops} crops unclassified"
        )

    def finish(self, status: str, reason: str | None) -> None:
        """Send the frame's answer: its detections, those classified with their classes."""
        now = time.monotonic()
        detections = [
            found.model_copy(update={"classes": self._classes[i]}) if i in self._classes else found
            for i, found in enumerate(self.result.detections)
        ]
        timing = self.result.timing_ms.model_copy(
            update={"total": round((now - self.frame.received) * 1000.0, 3)}
        )
        report = CascadeReport(
            model=self.model,
            status=status,  # type: ignore[arg-type]  # one of the Literal's values, set above
            crops=self._crops,
            classified=len(self._classes),
            ms=round((now - self.started) * 1000.0, 3),
            reason=reason,
        )
        self.frame.pixels = None  # the decode is no longer needed
        self._send(
            self.frame,
            self.result.model_copy(update={"detections": detections, "timing_ms": timing, "cascade": report}),
        )


class Cascades:
    """Starts each detector frame's cascade; `send` is the router's final answer path."""

    def __init__(self, table: TenantTable, send: SendFn) -> None:
        self.table = table
        self._send = send
        self.deadlines = Deadlines()

    def followed(self, model: str) -> bool:
        """A classifier follows `model`: its frames keep their full-resolution decode (event loop)."""
        return self.table.follower(model) is not None

    def start(self, frame: Frame, result: DetectionResult) -> bool:
        """Run the cascade of a detector's answer (a detector worker's thread); False when no
        classifier follows its model any more (the answer then goes out as it is)."""
        follower = self.table.follower(frame.model)
        pixels = frame.pixels
        if follower is None or pixels is None:
            return False
        model, spec = follower
        job = Job(frame, result, model, spec, self._finished)
        tenant = self.table.get(model)
        if tenant is None:
            why = self.table.unavailable_reason(model) or "is not placed"
            job.finish("unavailable", f"classifier {model!r} {why}")
            return True
        height, width = pixels.shape[:2]
        chosen = chosen_boxes(result.detections, spec, width, height)
        if not chosen:
            job.finish("complete", None)
            return True
        job.expect(len(chosen))
        deadline = job.started + spec.timeout_ms / 1000.0
        if frame.expires_at is not None:
            deadline = min(deadline, frame.expires_at)
        crops = [
            Frame(
                request_id=f"{frame.request_id}#{index}",
                model=model,
                image=b"",
                received=job.started,
                expires_at=deadline,
                pixels=crop(pixels, result.detections[index].box, spec.margin),
                on_answer=partial(job.answer, index),
            )
            for index in chosen
        ]
        self.deadlines.add(deadline, job.expire)
        tenant.submit_many(crops)
        return True

    def _finished(self, frame: Frame, result: DetectionResult) -> None:
        """The console's last detections show the classes too (telemetry)."""
        detector = self.table.get(frame.model)
        if detector is not None:
            detector.answers.last_detections = result.detections
        self._send(frame, result)

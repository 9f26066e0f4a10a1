"""Fault injection: make a backend on a device hang, raise or slow down after N frames.

For operators (chaos testing of a real deployment) and for tests. Off unless set, loudly logged
when on. One fault per `backend:device:kind[:option...]`, several separated by commas, from
`EDGE_AGENT_FAULTS` or `faults` in agent.toml (docs/reliability.md, "Fault injection"):

    openvino:CPU:hang:after=200          every call after the first 200 frames hangs
    openvino:CPU:hang:after=200:once     only the one call hangs (a one-shot fault)
    onnxruntime:cpu:error:after=50:count=3
    openvino:GPU:slow:ms=400             every call takes 400 ms longer

Options: `after=N` frames served normally first (counted per backend and device, every tenant
together); `count=N` calls affected, then the fault is spent (`once` is count=1); `ms=D` the delay
of `slow` (default 500) or how long `hang` lasts (default: until the process exits). A fault spent
or not, probes and warm-ups on that device meet it too once it fired (they count no frames).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from backends.base import InferenceError

log = logging.getLogger(__name__)

FaultKind = Literal["hang", "error", "slow"]
KINDS: tuple[FaultKind, ...] = ("hang", "error", "slow")


class FaultSpecError(ValueError):
    """A fault specification that does not parse."""


@dataclass
class Fault:
    backend: str
    device: str
    kind: FaultKind
    after: int = 0
    count: int | None = None  # calls affected; None: every call from the trigger on
    ms: float | None = None
    frames: int = 0  # frames run on this backend:device so far
    fired: int = 0  # calls affected so far
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _release: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def text(self) -> str:
        parts = [self.backend, self.device, self.kind, f"after={self.after}"]
        if self.count is not None:
            parts.append(f"count={self.count}")
        if self.ms is not None:
            parts.append(f"ms={self.ms:g}")
        return ":".join(parts)

    def matches(self, backend: str, device: str) -> bool:
        return backend.lower() == self.backend.lower() and device.lower() == self.device.lower()

    def inject(self, rows: int) -> None:
        """Before a runtime call of `rows` frames (0: a warm-up or a probe, which counts none)."""
        with self._lock:
            self.frames += rows
            spent = self.count is not None and self.fired >= self.count
            if spent or self.frames <= self.after or (rows == 0 and self.fired == 0):
                return
            self.fired += 1
            fired = self.fired
        log.error(
            "FAULT INJECTED (%s): call %d after %d frames on %s:%s",
            self.kind,
            fired,
            self.frames,
            self.backend,
            self.device,
        )
        if self.kind == "hang":
            self._release.wait(None if self.ms is None else self.ms / 1000.0)
        elif self.kind == "error":
            raise InferenceError(f"injected fault: {self.backend}:{self.device} error (call {fired})")
        else:
            time.sleep((500.0 if self.ms is None else self.ms) / 1000.0)

    def release(self) -> None:
        """Let hung calls return (tests, and clearing the faults)."""
        self._release.set()


def parse_fault(text: str) -> Fault:
    parts = [p.strip() for p in text.strip().split(":")]
    kinds = [i for i, p in enumerate(parts) if i >= 2 and p in KINDS]
    if len(parts) < 3 or not kinds or not parts[0]:
        raise FaultSpecError(
            f"fault {text!r}: expected backend:device:hang|error|slow[:after=N][:count=N|:once][:ms=D]"
        )
    at = kinds[0]
    fault = Fault(backend=parts[0], device=":".join(parts[1:at]), kind=parts[at])  # type: ignore[arg-type]
    for option in parts[at + 1 :]:
        name, _, value = option.partition("=")
        try:
            if name == "once" and not value:
                fault.count = 1
            elif name == "after":
                fault.after = int(value)
            elif name == "count":
                fault.count = int(value)
            elif name == "ms":
                fault.ms = float(value)
            else:
                raise ValueError
        except ValueError:
            raise FaultSpecError(f"fault {text!r}: unknown option {option!r}") from None
        if fault.after < 0 or (fault.count is not None and fault.count < 1) or (fault.ms or 0) < 0:
            raise FaultSpecError(f"fault {text!r}: {option!r} out of range")
    return fault


class FaultSet:
    def __init__(self, faults: list[Fault] | None = None) -> None:
        self.faults = list(faults or [])

    @classmethod
    def parse(cls, text: str) -> FaultSet:
        return cls([parse_fault(part) for part in text.split(",") if part.strip()])

    def find(self, backend: str, device: str) -> Fault | None:
        return next((f for f in self.faults if f.matches(backend, device)), None)

    def release(self) -> None:
        for fault in self.faults:
            fault.release()


_active = FaultSet()


def configure(text: str) -> FaultSet:
    """Make the faults in `text` active for every tenant loaded from now on (empty: none)."""
    parsed = FaultSet.parse(text)
    _active.release()
    _active.faults = parsed.faults
    for fault in _active.faults:
        log.critical("FAULT INJECTION IS ON: %s (this device will misbehave on purpose)", fault.text)
    return _active


def active() -> FaultSet:
    return _active

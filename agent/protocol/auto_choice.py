"""Status `auto`: why automatic placement put a tenant where it did, and how it tuned it."""

from __future__ import annotations

from pydantic import BaseModel


class TunedChoice(BaseModel):
    """The instances, threads and batch limit `auto_tune` picked, with the estimates behind them."""

    instances: int
    threads: int
    batch_max_size: int
    fps: float  # estimated frames per second of this configuration (shared resource counted)
    goodput: float  # of which within the objective (all of them without one)
    latency_ms: float  # estimated arrival-to-answer of a frame in a full batch, one batch queued ahead
    reason: str
    table: dict[str, float]  # "x<instances> t<threads> b<batch>" -> ms per batch, on the chosen device


class AutoChoice(BaseModel):
    """Why `backend: "auto"` (or `device: "auto"`) became this backend/device: the measured figures."""

    backend: str
    device: str
    reason: str
    candidates: dict[str, float]  # "backend:device" -> measured img/s for this tenant's instance count
    # Several auto tenants: total img/s of each shortlisted combination, measured running together.
    together: dict[str, float] | None = None
    # `auto_tune` tenants: what was picked, why, and the latency table it was picked from.
    tuned: TunedChoice | None = None

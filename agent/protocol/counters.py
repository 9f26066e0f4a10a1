"""Counters of telemetry, one typed source for it and both /metrics endpoints (every field is exported
as a Prometheus counter: agent/observability/prometheus.py, the console's). Re-exported by schemas.py.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class TenantCounters(BaseModel):
    """A tenant's counters since it started (a moved model starts again at 0)."""

    frames_in: int = Field(default=0, description="Frames routed to the tenant.")
    frames_out: int = Field(default=0, description="Frames answered with a result.")
    errors: int = Field(default=0, description="Frames answered with an error by the tenant.")
    drops: int = Field(
        default=0, description="Frames dropped by the overload policy (answered `overloaded`)."
    )
    stalls: int = Field(default=0, description="Batches answered `internal` because the runtime call hung.")
    # Latency objectives (docs/protocol.md "Latency objectives"): results in time, misses by reason.
    within_objective: int = Field(default=0, description="Results within the tenant's latency objective.")
    missed_queueing: int = Field(default=0, description="Results late: they waited too long to start.")
    missed_inference: int = Field(default=0, description="Results late: their own serving took too long.")
    shed: int = Field(
        default=0, description="Frames answered `shed`: they could no longer make the objective."
    )


class DeviceCounters(BaseModel):
    """The agent's own counters since it started (not a tenant's)."""

    duplicates: int = Field(
        default=0, description="Frames not run again: their request id was served or in flight."
    )
    publishes_refused: int = Field(
        default=0,
        description="Publishes the broker refused (MQTT 5 reason code, e.g. not authorised by its ACL).",
    )

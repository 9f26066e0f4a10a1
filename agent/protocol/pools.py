"""Device pools on the wire (docs/pools.md): what a member announces on `<prefix>/pool/<name>/members`.

One typed model for the agent (producer) and the console (consumer)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PoolMemberState(BaseModel):
    """A member's announcement: on every change of `open` or `busy`, and every HEARTBEAT_S seconds.

    Counters run since the member's start; a reader takes differences between announcements."""

    # Unknown fields are ignored: a newer agent may announce more.
    model_config = ConfigDict(extra="ignore")

    device_id: str
    pool: str
    model: str
    open: bool  # in the pool's shared subscription now (False: left it, being full)
    busy: bool  # its queue is at least half full: not a member the others leave the pool for
    queued: int = Field(ge=0)
    depth: int = Field(ge=1)
    served: int = Field(default=0, ge=0)  # pool frames answered with a result
    errors: int = Field(default=0, ge=0)  # pool frames answered with an error
    latency_ms_sum: float = Field(default=0.0, ge=0.0)  # arrival to answer, summed over `served`
    left: int = Field(default=0, ge=0)  # times it left the share for being full


HEARTBEAT_S = 1.0  # a member announces at least this often
MEMBER_TTL_S = 3.5  # a member not heard from for this long is gone (dead, or out of the pool)

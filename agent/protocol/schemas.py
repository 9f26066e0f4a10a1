"""Wire payloads of docs/protocol.md as pydantic models: the one thing agent and console share."""

from __future__ import annotations

import time
from collections import Counter
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from agent.protocol.auto_choice import AutoChoice
from agent.protocol.counters import DeviceCounters, TenantCounters
from agent.protocol.delivery import DeliveryProgress, InstalledModel
from agent.protocol.topics import MODEL_NAME_RE, POOL_NAME_RE, VERSION_RE, tenant_key, valid_model_name

ErrorCode = Literal[
    "bad_request",  # a JSON envelope that does not parse or validate
    "bad_image",  # not a decodable JPEG/PNG, truncated, or over the pixel limit
    "too_large",  # payload over the configured byte limit
    "unknown_model",  # no tenant serves that model
    "overloaded",  # dropped by the overload policy
    "expired",  # MQTT 5 message expiry passed before inference
    "unavailable",  # the tenant for this model failed to load
    "shutting_down",  # the agent is stopping and could not serve it in time
    "internal",  # a bug or runtime failure; the agent keeps serving
    "shed",  # it could no longer meet its tenant's latency objective: answered at once, not late
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Envelope(Strict):
    """JSON envelope for MQTT 3.1.1 clients that cannot set properties."""

    request_id: str | None = Field(default=None, max_length=256)
    model: str | None = None
    image_b64: str


class TopK(BaseModel):
    index: int
    label: str
    score: float


class TenantRef(BaseModel):
    backend: str
    device: str
    instance: int


class Timing(BaseModel):
    queue: float
    preprocess: float
    infer: float
    total: float


class _Served(BaseModel):
    """What every served frame's answer starts with (fields in wire order)."""

    request_id: str
    model: str
    tenant: TenantRef
    version: str | None = None  # the model version that served it (None from agents before it)


class InferResult(_Served):
    top: list[TopK]
    timing_ms: Timing
    batch_size: int = 1
    ts: float = Field(default_factory=time.time)


class Box(BaseModel):
    """A box in 0..1 of the original frame's width (x) and height (y), any resize undone."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


class Detection(BaseModel):
    index: int
    label: str
    score: float
    box: Box
    # A cascade's classifier on this box (docs/detection.md "Cascades"): its best classes, best first.
    classes: list[TopK] | None = None


class CascadeReport(BaseModel):
    """How a cascade's classifier went on this frame's boxes (docs/protocol.md "Cascades")."""

    model: str  # the classifier tenant's model
    # complete: every selected box classified; partial: some crops failed; timed_out: the frame's
    # deadline came first (boxes without `classes`); unavailable: the classifier serves nothing now.
    status: Literal["complete", "partial", "timed_out", "unavailable"]
    crops: int  # boxes sent to the classifier (labels, minimum size and max_crops applied)
    classified: int
    ms: float  # from the detector's answer to the last crop's
    reason: str | None = None


class DetectionResult(_Served):
    """A detection tenant's answer: its boxes, best score first (none is a valid answer)."""

    detections: list[Detection]
    timing_ms: Timing
    batch_size: int = 1
    ts: float = Field(default_factory=time.time)
    cascade: CascadeReport | None = None  # a classifier follows this detector


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str


class ErrorResult(BaseModel):
    request_id: str
    model: str | None = None
    error: ErrorInfo
    ts: float = Field(default_factory=time.time)


class BatchSpec(Strict):
    max_size: int = Field(default=1, ge=1, le=256)
    max_delay_ms: float = Field(default=0.0, ge=0.0, le=1000.0)


BACKEND_PATTERN = r"^[a-z0-9_-]{1,32}$"
DEVICE_PATTERN = r"^[A-Za-z0-9_.:-]{1,32}$"


class Candidate(Strict):
    """One place a tenant may serve from: a backend and one of its devices (docs/protocol.md)."""

    backend: str = Field(pattern=BACKEND_PATTERN)
    device: str = Field(default="cpu", pattern=DEVICE_PATTERN)

    @field_validator("backend")
    @classmethod
    def _concrete(cls, value: str) -> str:
        if value == "auto":
            raise ValueError("a candidate names a backend; `auto` is a tenant's backend, not a candidate")
        return value

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.device}"


class CascadeSpec(Strict):
    """A classifier tenant run on the boxes of a detector tenant (docs/detection.md "Cascades")."""

    after: str  # the detector tenant's model, in the same placement
    labels: list[str] | None = Field(default=None, min_length=1, max_length=1000)  # None: every box
    min_box_px: int = Field(default=32, ge=1, le=100_000)  # smaller side, pixels of the original frame
    max_crops: int = Field(default=10, ge=1, le=256)  # per frame, best detections first
    margin: float = Field(default=0.1, ge=0.0, le=1.0)  # added on each side, as a fraction of the box
    top_k: int = Field(default=3, ge=1, le=20)  # classes given per box
    timeout_ms: float = Field(default=1000.0, gt=0.0, le=60_000.0)  # deadline without message expiry


class TenantSpec(Strict):
    """One tenant of a placement: a model on a backend/device with N instances.

    `candidates`, when given, is the ordered list of (backend, device) it may serve from: the first
    healthy one serves (failover and failback, docs/reliability.md). `backend`/`device` then default
    to the first candidate.
    """

    model: str
    backend: str = Field(default="onnxruntime", pattern=BACKEND_PATTERN)
    device: str = Field(default="cpu", pattern=DEVICE_PATTERN)
    instances: int = Field(default=1, ge=1, le=32)
    threads: int | None = Field(default=None, ge=1, le=256)
    # Numeric precision where the backend offers a choice: tflite "int8" picks the full-integer
    # model, torch/tensorrt "fp16" runs half precision. None: the backend's default (fp32).
    precision: Literal["fp32", "fp16", "int8"] | None = None
    batch: BatchSpec = Field(default_factory=BatchSpec)
    # Detection tenants only (docs/detection.md): the lowest score reported (default: the model's
    # score_threshold), at most this many boxes per frame, only these labels.
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    max_detections: int | None = Field(default=None, ge=1, le=1000)
    labels: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    candidates: list[Candidate] | None = Field(default=None, min_length=1, max_length=8)
    # The model version to serve (docs/fleet.md); None: the newest the device has installed.
    version: str | None = Field(default=None, pattern=VERSION_RE.pattern)
    # Classifier tenants only: run on the boxes of a detector tenant (docs/detection.md "Cascades").
    cascade: CascadeSpec | None = None
    pool: str | None = Field(default=None, pattern=POOL_NAME_RE.pattern)  # a device pool (docs/pools.md)
    # Arrival to answer, ms (docs/protocol.md "Latency objectives"); None: served as fast as it can.
    latency_objective_ms: float | None = Field(default=None, ge=1.0, le=60000.0)
    priority: Literal["high", "normal", "low"] = "normal"
    # Let automatic placement also pick instances, threads and batch.max_size from measured latency
    # tables (docs/protocol.md "Automatic placement"); the values given are then replaced.
    auto_tune: bool = False
    # Set by the Placement that holds it (it depends on the other tenants): see tenant_key().
    _key: str | None = PrivateAttr(default=None)

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not valid_model_name(value):
            raise ValueError(f"model name must match {MODEL_NAME_RE.pattern}")
        return value

    @model_validator(mode="after")
    def _first_candidate(self) -> TenantSpec:
        if self.candidates:
            self._check_first_candidate(self.candidates[0])
        objective = self.latency_objective_ms
        if objective is not None and self.batch.max_delay_ms >= objective:
            raise ValueError(
                f"batch.max_delay_ms ({self.batch.max_delay_ms:g}) must be under latency_objective_ms "
                f"({objective:g}): a frame waiting that long for company would always miss it"
            )
        return self

    def _check_first_candidate(self, first: Candidate) -> None:
        """With candidates, backend/device are the first candidate's (left out, or the same)."""
        labels = [c.label.lower() for c in self.candidates or []]
        if len(set(labels)) != len(labels):
            raise ValueError("a candidate appears twice")
        for name in ("backend", "device"):
            mine, theirs = getattr(self, name), getattr(first, name)
            if name not in self.model_fields_set:
                setattr(self, name, theirs)
            elif mine.lower() != theirs.lower():
                raise ValueError(f"{name} {mine!r} is not the first candidate's ({theirs!r}); leave it out")

    def candidate_list(self) -> list[Candidate]:
        """The candidates in order; a tenant without any has one: its backend and device."""
        if self.candidates:
            return list(self.candidates)
        return [Candidate(backend=self.backend, device=self.device)]

    def on(self, candidate: Candidate) -> TenantSpec:
        """This tenant's spec with `candidate` as its backend and device (candidates kept)."""
        return self.model_copy(update={"backend": candidate.backend, "device": candidate.device})

    def tenant_key(self) -> str:
        """The tenant's key on the device: frames, status and telemetry name it by this. The model
        name, unless its placement holds another tenant of the same model: then a pinned tenant is
        `name@version` (docs/protocol.md "Two versions side by side")."""
        return self._key if self._key is not None else self.model

    def key(self) -> tuple[object, ...]:
        """Identity of a running tenant: any change means a new tenant (make-before-break)."""
        return (
            self.model,
            self.backend,
            self.device.lower(),
            self.instances,
            self.threads,
            self.precision,
            self.batch.max_size,
            self.batch.max_delay_ms,
            (self.min_score, self.max_detections, tuple(self.labels or ())),
            tuple(c.label.lower() for c in self.candidates or []),
            (self.version, self.pool),
            None if self.cascade is None else self.cascade.model_dump_json(),
            self.latency_objective_ms,
            self.priority,
        )


class Placement(Strict):
    generation: int = Field(default=0, ge=0)
    tenants: list[TenantSpec] = Field(default_factory=list, max_length=64)
    # Present on signed placements (agent/protocol/signing.py); required by devices configured with
    # a placement public key.
    signed_at: float | None = None
    expires_at: float | None = None
    signature: str | None = Field(default=None, max_length=200)

    @field_validator("tenants")
    @classmethod
    def _one_tenant_per_version(cls, tenants: list[TenantSpec]) -> list[TenantSpec]:
        """Two versions of one model may serve side by side; the same version twice may not. Each
        tenant's key: its model name, or `name@version` when pinned beside another of its model (so
        switching a lone tenant's version keeps its key: a version that fails to load leaves the
        old one serving)."""
        per_model = Counter(t.model for t in tenants)
        seen: set[tuple[str, str | None]] = set()
        for tenant in tenants:
            if (tenant.model, tenant.version) in seen:
                what = "without a version" if tenant.version is None else f"version {tenant.version!r}"
                raise ValueError(
                    f"model {tenant.model!r} {what} appears twice; one tenant per model and version"
                )
            seen.add((tenant.model, tenant.version))
            beside = per_model[tenant.model] > 1
            tenant._key = tenant_key(tenant.model, tenant.version if beside else None)
        return tenants


def generation_refusal(generation: int, applied: int | None) -> str | None:
    """Generations only go forward (docs/protocol.md "How the agent applies a placement"): why a
    document of `generation` is refused where `applied` is in force, or None when it is not."""
    if applied is not None and generation < applied:
        return f"generation {generation} is older than the applied {applied}"
    return None


TenantState = Literal["loading", "ready", "draining", "failed"]


class Failover(BaseModel):
    """A tenant moved between its candidates: `from` and `to` are "backend:device"."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    kind: Literal["failover", "failback"] = "failover"
    source: str = Field(alias="from")
    to: str
    reason: str
    ts: float = Field(default_factory=time.time)
    # Seconds from the fault being noticed to the tenant serving on `to` (failovers).
    recovery_s: float | None = None


class TenantStatus(TenantSpec):
    state: TenantState
    # What frames name to reach it (`name`, or `name@version` when pinned), and the version it
    # serves (the newest installed when not pinned). None from agents before side-by-side versions.
    address: str | None = None
    serving_version: str | None = None
    error: str | None = None
    auto: AutoChoice | None = None
    # Tenants with candidates: the one serving now (backend/device above say the same), the last
    # move between candidates and the recent ones, oldest first.
    serving: Candidate | None = None
    last_failover: Failover | None = None
    failovers: list[Failover] = Field(default_factory=list)

    def _check_first_candidate(self, first: Candidate) -> None:
        """In status, backend/device are where the tenant serves, which may be a later candidate."""

    def placed(self) -> TenantSpec:
        """The placement entry this tenant serves (with candidates: as placed, on the first)."""
        entry = self.model_dump(include=set(TenantSpec.model_fields))
        if self.candidates:
            entry.pop("backend"), entry.pop("device")
        return TenantSpec.model_validate(entry)


class FailoverEvent(Failover):
    """Published on edge/<id>/events when a tenant moves between candidates."""

    type: Literal["failover"] = "failover"
    device_id: str
    model: str


class Refusal(BaseModel):
    generation: int | None = None
    reason: str
    ts: float = Field(default_factory=time.time)


class BackendCapability(BaseModel):
    available: bool
    devices: list[str] = Field(default_factory=list)
    reason: str = ""


class Capabilities(BaseModel):
    backends: dict[str, BackendCapability] = Field(default_factory=dict)
    models: list[str] = Field(default_factory=list)
    # Every installed model with its versions and digests, and the recent deliveries (docs/fleet.md).
    installed: list[InstalledModel] = Field(default_factory=list)
    deliveries: list[DeliveryProgress] = Field(default_factory=list)


class PlacementStatus(BaseModel):
    generation: int | None = None
    applied_generation: int | None = None
    tenants: list[TenantStatus] = Field(default_factory=list)
    refused: Refusal | None = None  # the last document refused, and why (the old placement kept serving)


class Status(BaseModel):
    online: bool
    device_id: str | None = None
    agent_version: str | None = None
    started_at: float | None = None
    capabilities: Capabilities | None = None
    placement: PlacementStatus | None = None
    errors: list[str] = Field(default_factory=list)
    ts: float = Field(default_factory=time.time)
    # The MQTT version the agent speaks with the broker: "5", or "3.1.1" where the broker refused 5.
    mqtt_protocol: str | None = None
    mqtt_broker: str | None = None  # the broker node connected to, host:port (several: broker.nodes)
    tags: dict[str, str] = Field(default_factory=dict)  # agent.toml `tags`, for docs/fleet.md#selectors


# -- Telemetry (docs/protocol.md "Telemetry") ---------------------------------------------------------
# One typed schema for every producer and reader: the agent's stats and reporting, its Prometheus and
# Home Assistant exports, the console's store and fleet /metrics. A counter added to TenantCounters or
# DeviceCounters travels in telemetry and is exported by both /metrics endpoints with no other change
# (its `description` is the Prometheus help text).

# The codes a frame may be refused with before it reaches a tenant (telemetry `rejected`).
REJECTED_CODES: tuple[ErrorCode, ...] = (
    "bad_request",
    "bad_image",
    "too_large",
    "unknown_model",
    "unavailable",
    "shutting_down",
)


class Percentiles(BaseModel):
    """p50, p95, p99 of `timing_ms.total` over the window, ms (0 when nothing was served)."""

    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0


class TenantWindow(TenantCounters):
    """What a tenant's stats say at the end of a telemetry window: counters and the window's figures."""

    fps: float = 0.0
    latency_ms: Percentiles = Field(default_factory=Percentiles)
    batch_size_mean: float = 0.0
    # Of the frames answered in the window (results and `shed`), the share within the objective;
    # null without an objective or without answers.
    objective_share: float | None = None


class TenantIdentity(BaseModel):
    model: str  # the tenant's key: `name`, or `name@version` for a pinned tenant
    backend: str
    device: str
    instances: int
    state: TenantState
    version: str | None = None  # the model version it serves


class TenantTelemetry(TenantWindow, TenantIdentity):
    failovers: int = 0  # moves of this tenant between its candidates since the agent started
    queue_depth: int
    # Detection tenants: the boxes of the last frame served (labels, scores, boxes), for the console.
    last_detections: list[Detection] | None = None


class GpuTelemetry(BaseModel):
    """One NVIDIA GPU as NVML reports it (agents with nvidia-ml-py)."""

    index: int
    name: str
    utilization: float  # busy fraction, 0..1
    memory_used_mb: float
    memory_total_mb: float
    temperature_c: float | None = None


class DeviceTelemetry(BaseModel):
    cpu_percent: float
    rss_mb: float
    temperature_c: float | None = None
    load_1m: float | None = None
    # The whole device (not the agent process): memory, free disk where the state lives, GPUs.
    memory_total_mb: float | None = None
    memory_available_mb: float | None = None
    disk_free_mb: float | None = None
    gpus: list[GpuTelemetry] | None = None


class Telemetry(DeviceCounters):
    device_id: str
    ts: float = Field(default_factory=time.time)
    interval_s: float
    tenants: list[TenantTelemetry]
    device: DeviceTelemetry
    rejected: dict[str, int] = Field(default_factory=dict)
    # Publishes the broker dropped (its queue or in-flight limits), all clients together, since it
    # started: Mosquitto's $SYS/broker/publish/messages/dropped. None where the broker does not say.
    broker_dropped: int | None = None

"""A fleet of lightweight fake agents for demos and load checks: `edge-console simulate`.

Each simulated device speaks the wire contract of docs/protocol.md with the same payload models as
the real agent (agent.protocol.schemas): a retained status (capabilities, placement with generation and
applied_generation, tenants with state, errors), telemetry every `interval_s`, and it applies the
retained placement published to it, refusing what the real agent refuses (a document that does not
validate, an older generation, an unknown model or backend; it also refuses "auto", which it cannot
profile), and failing a tenant whose backend or device it does not have.

Connections: devices share a few MQTT connections (`per_connection` devices each, 100 by default),
not one TCP connection per device. 500 devices are 5 connections, 5 network threads: light enough to
run beside the console on a laptop, and the broker still sees one publisher per device id on the
topics. The cost of that choice: an MQTT last will belongs to a connection, so a simulated device
has no will of its own; on a clean stop the simulator publishes every device's retained
`{"online": false}` itself (a killed simulator leaves its devices "online", then "stale" in the
console, which is what the console's stale marker is for).

For rollouts (docs/fleet.md#rollouts) devices carry tags (`site`, `hw`), report installed model
versions, install a version the console delivers on `edge/<id>/models`, refuse a version they lack,
and can be faulty: `SimFault` makes a share of the devices fail to load a version, answer errors
with it, or serve it slower. A device can be taken offline and brought back (`set_online`).
"""

from __future__ import annotations

import logging
import math
import random
import ssl
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from agent.protocol.delivery import DeliveryProgress, InstalledModel, InstalledVersion, ModelDelivery
from agent.protocol.runtimes import BACKEND_DEVICES, device_declared
from agent.protocol.schemas import (
    BackendCapability,
    Capabilities,
    DeviceTelemetry,
    Percentiles,
    Placement,
    PlacementStatus,
    Status,
    Telemetry,
    TenantSpec,
    TenantState,
    TenantStatus,
    TenantTelemetry,
    generation_refusal,
)
from agent.protocol.topics import Topics, parse_device_topic

log = logging.getLogger(__name__)

SIM_VERSION = "0.1.0-sim"
# The backend names the real agent's registry knows (available or not on a given device), and the
# devices each may offer: the backends' own declarations, as agent.protocol carries them.
KNOWN_BACKENDS = tuple(sorted(BACKEND_DEVICES))
MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
MODEL_COST = {"efficientnet-lite0": 1.0, "efficientnet-lite1": 1.45, "efficientnet-lite2": 2.1}
QUEUE_LIMIT = 64
BUNDLED_VERSION = "1.0.0"
SITES = ("north", "south", "east")
FAULT_KINDS = ("load", "errors", "slow")
FAULT_ERROR_SHARE = 0.3  # of the frames an "errors" fault answers with an error


@dataclass(frozen=True)
class SimFault:
    """A share of the devices misbehaves with one model version: it fails to `load`, answers
    `errors`, or is `slow` (latency times `factor`). Which devices is fixed by their id."""

    kind: str
    share: float
    version: str
    model: str | None = None
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS or not 0.0 <= self.share <= 1.0 or self.factor <= 0:
            raise ValueError(f"fault {self}: kind one of {FAULT_KINDS}, share 0..1, factor > 0")

    def hits(self, device_id: str, spec: TenantSpec) -> bool:
        if spec.version != self.version or (self.model is not None and spec.model != self.model):
            return False
        return zlib.crc32(f"{self.kind}:{device_id}".encode()) / 2**32 < self.share

    @classmethod
    def parse(cls, text: str) -> SimFault:
        """`KIND:SHARE:VERSION[:FACTOR]`, e.g. `load:0.2:3` or `slow:1:3:2.5`."""
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"--fault {text!r}: KIND:SHARE:VERSION[:FACTOR]")
        try:
            factor = float(parts[3]) if len(parts) == 4 else 2.0
            return cls(parts[0], float(parts[1]), parts[2], None, factor)
        except ValueError as exc:
            raise ValueError(f"--fault {text!r}: {exc}") from exc


def _cap(devices: list[str] | None, reason: str = "") -> BackendCapability:
    if devices is None:
        return BackendCapability(available=False, devices=[], reason=reason)
    return BackendCapability(available=True, devices=devices)


@dataclass(frozen=True)
class Profile:
    """A kind of edge box: what it can run and how fast (frames/s of one lite0 instance)."""

    name: str
    backends: dict[str, BackendCapability]
    models: tuple[str, ...]
    speed: dict[str, float]  # "<backend>:<device lower>" -> fps
    initial: tuple[tuple[str, str, str], ...]  # (model, backend, device) tenants at start

    def __post_init__(self) -> None:
        """A simulated box offers only devices its backends declare (agent.protocol.runtimes)."""
        for backend, cap in self.backends.items():
            undeclared = [d for d in cap.devices if not device_declared(backend, d)]
            if backend not in BACKEND_DEVICES or undeclared:
                raise ValueError(f"profile {self.name}: {backend} does not offer {undeclared or 'anything'}")


PROFILES: tuple[Profile, ...] = (
    Profile(
        "x86-openvino",
        {
            "onnxruntime": _cap(["cpu"]),
            "openvino": _cap(["CPU", "GPU", "NPU", "AUTO"]),
            "tflite": _cap(None, "ai-edge-litert is not installed"),
            "edgetpu": _cap(None, "libedgetpu.so.1 not found"),
            "tensorrt": _cap(None, "tensorrt is not installed"),
            "torch": _cap(None, "torch is not installed"),
        },
        MODELS,
        {
            "onnxruntime:cpu": 55,
            "openvino:cpu": 80,
            "openvino:gpu": 160,
            "openvino:npu": 130,
            "openvino:auto": 150,
        },
        (("efficientnet-lite0", "onnxruntime", "cpu"), ("efficientnet-lite1", "openvino", "GPU")),
    ),
    Profile(
        "jetson",
        {
            "onnxruntime": _cap(["cpu", "cuda:0", "tensorrt:0"]),
            "tensorrt": _cap(["cuda:0"]),
            "torch": _cap(["cpu", "cuda:0"]),
            "tflite": _cap(["cpu"]),
            "openvino": _cap(None, "openvino is not installed"),
            "edgetpu": _cap(None, "libedgetpu.so.1 not found"),
        },
        MODELS,
        {
            "onnxruntime:cpu": 12,
            "onnxruntime:cuda:0": 140,
            "onnxruntime:tensorrt:0": 260,
            "tensorrt:cuda:0": 300,
            "torch:cpu": 8,
            "torch:cuda:0": 110,
            "tflite:cpu": 15,
        },
        (("efficientnet-lite0", "onnxruntime", "cuda:0"),),
    ),
    Profile(
        "rpi-coral",
        {
            "tflite": _cap(["cpu"]),
            "edgetpu": _cap(["usb:0"]),
            "onnxruntime": _cap(["cpu"]),
            "openvino": _cap(None, "openvino is not installed"),
            "tensorrt": _cap(None, "tensorrt is not installed"),
            "torch": _cap(None, "torch is not installed"),
        },
        ("efficientnet-lite0", "efficientnet-lite1"),
        {"tflite:cpu": 9, "edgetpu:usb:0": 120, "onnxruntime:cpu": 7},
        (("efficientnet-lite0", "edgetpu", "usb:0"),),
    ),
    Profile(
        "gpu-server",
        {
            "onnxruntime": _cap(["cpu", "cuda:0", "cuda:1", "tensorrt:0"]),
            "tensorrt": _cap(["cuda:0", "cuda:1"]),
            "torch": _cap(["cpu", "cuda:0", "cuda:1"]),
            "openvino": _cap(["CPU"]),
            "tflite": _cap(None, "ai-edge-litert is not installed"),
            "edgetpu": _cap(None, "libedgetpu.so.1 not found"),
        },
        MODELS,
        {
            "onnxruntime:cpu": 90,
            "onnxruntime:cuda:0": 900,
            "onnxruntime:cuda:1": 900,
            "onnxruntime:tensorrt:0": 1600,
            "tensorrt:cuda:0": 1800,
            "tensorrt:cuda:1": 1800,
            "torch:cpu": 60,
            "torch:cuda:0": 700,
            "torch:cuda:1": 700,
            "openvino:cpu": 120,
        },
        (("efficientnet-lite0", "onnxruntime", "cuda:0"), ("efficientnet-lite2", "tensorrt", "cuda:1")),
    ),
)


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


@dataclass
class SimTenant:
    spec: TenantSpec
    state: TenantState = "ready"
    error: str | None = None
    demand_fps: float = 20.0  # what the cameras send it
    base_fps: float = 0.0  # the demand it wanders around (0: its first demand)
    error_debt: float = 0.0  # error answers owed by an "errors" fault, below one
    frames_in: int = 0
    frames_out: int = 0
    errors: int = 0
    drops: int = 0
    queue: float = 0.0


@dataclass
class SimDevice:
    device_id: str
    profile: Profile
    rng: random.Random
    started_at: float = field(default_factory=time.time)
    tenants: dict[str, SimTenant] = field(default_factory=dict)  # model -> serving tenant
    loading: dict[str, SimTenant] = field(default_factory=dict)  # model -> tenant being loaded
    failed: dict[str, SimTenant] = field(default_factory=dict)
    target: Placement | None = None
    apply_at: float = 0.0
    desired_generation: int | None = 0
    applied_generation: int | None = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    next_telemetry: float = 0.0
    tags: dict[str, str] = field(default_factory=dict)
    installed: dict[str, list[str]] = field(default_factory=dict)  # model -> versions, newest first
    deliveries: list[DeliveryProgress] = field(default_factory=list)
    faults: tuple[SimFault, ...] = ()
    offline: bool = False

    def __post_init__(self) -> None:
        for model, backend, device in self.profile.initial:
            spec = TenantSpec(model=model, backend=backend, device=device)
            self.tenants[model] = SimTenant(spec, demand_fps=self.rng.uniform(5, 45))

    @property
    def topics(self) -> Topics:
        return Topics(self.device_id)

    # -- placement ------------------------------------------------------------------------------
    def _refuse(self, now: float, message: str) -> None:
        self.errors.append(f"{_stamp(now)} {message}")

    def apply(self, payload: bytes, now: float) -> None:
        """What the real agent does with a placement document, at simulation speed."""
        if not payload:
            return
        try:
            doc = Placement.model_validate_json(payload)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}" for e in exc.errors()[:5]
            )
            self._refuse(now, f"placement refused: {problems}")
            return
        gen = doc.generation
        stale = generation_refusal(gen, self.applied_generation)  # the agent's own rule
        if stale is not None:
            self._refuse(now, f"placement generation {gen} refused: {stale}")
            return
        for spec in doc.tenants:
            if spec.model not in self.profile.models:
                self._refuse(now, f"placement generation {gen} refused: unknown model {spec.model!r}")
                return
            if spec.version is not None and spec.version not in self.installed.get(spec.model, []):
                self._refuse(
                    now,
                    f"placement generation {gen} refused: {spec.model} {spec.version} is not installed",
                )
                return
            if spec.backend not in KNOWN_BACKENDS:
                known = ", ".join(KNOWN_BACKENDS)
                self._refuse(
                    now,
                    f"placement generation {gen} refused: unknown backend {spec.backend!r} (known: {known})",
                )
                return
        self.desired_generation = gen
        self.target = doc
        self.loading.clear()
        for spec in doc.tenants:
            current = self.tenants.get(spec.model)
            if current is not None and current.spec.key() == spec.key():
                continue
            demand = current.demand_fps if current is not None else self.rng.uniform(5, 45)
            base = current.base_fps if current is not None else 0.0
            self.loading[spec.model] = SimTenant(spec, state="loading", demand_fps=demand, base_fps=base)
        self.apply_at = now + self.rng.uniform(0.2, 1.2) * max(1, len(self.loading))

    def tick(self, now: float) -> bool:
        """Finish a placement whose models have "loaded"; True when the status changed."""
        if self.target is None or now < self.apply_at:
            return False
        doc, self.target = self.target, None
        wanted = {spec.model for spec in doc.tenants}
        for model, tenant in self.loading.items():
            backend = self.profile.backends.get(tenant.spec.backend)
            problem = None
            if backend is None or not backend.available:
                reason = backend.reason if backend is not None else "not installed"
                problem = f"backend {tenant.spec.backend} unavailable: {reason}"
            elif tenant.spec.device.lower() not in {d.lower() for d in backend.devices}:
                problem = f"{tenant.spec.backend} has no device {tenant.spec.device!r}"
            elif self._fault("load", tenant.spec) is not None:
                problem = f"version {tenant.spec.version} failed to load (simulated fault)"
            if problem is not None:
                tenant.state, tenant.error = "failed", problem
                self.failed[model] = tenant
                self._refuse(now, f"{model} on {tenant.spec.backend}:{tenant.spec.device}: {problem}")
                continue  # the old tenant, if any, keeps serving
            tenant.state = "ready"
            self.tenants[model] = tenant
            self.failed.pop(model, None)
        self.loading.clear()
        for model in list(self.tenants):
            if model not in wanted:
                del self.tenants[model]
        keys = {spec.model: spec.key() for spec in doc.tenants}
        for model in list(self.failed):
            if self.failed[model].spec.key() != keys.get(model):  # no longer asked for (a rollback)
                del self.failed[model]
        self.applied_generation = doc.generation
        return True

    def _fault(self, kind: str, spec: TenantSpec) -> SimFault | None:
        return next((f for f in self.faults if f.kind == kind and f.hits(self.device_id, spec)), None)

    def deliver(self, payload: bytes, now: float) -> None:
        """A model version delivered (edge/<id>/models): installed at once, as the agent reports it."""
        try:
            doc = ModelDelivery.model_validate_json(payload)
        except ValidationError as exc:
            self._refuse(now, f"model delivery refused: {exc.errors()[0]['msg']}")
            return
        versions = self.installed.setdefault(doc.model, [])
        if doc.version not in versions:
            versions.insert(0, doc.version)
        total = doc.total_bytes
        self.deliveries = [d for d in self.deliveries if (d.model, d.version) != (doc.model, doc.version)]
        self.deliveries.append(
            DeliveryProgress(
                model=doc.model,
                version=doc.version,
                state="installed",
                bytes_done=total,
                bytes_total=total,
                ts=now,
            )
        )
        del self.deliveries[:-8]

    # -- reports --------------------------------------------------------------------------------
    def status(self) -> Status:
        tenants = [
            TenantStatus(**t.spec.model_dump(), state=t.state, error=t.error)
            for t in [*self.tenants.values(), *self.loading.values(), *self.failed.values()]
        ]
        return Status(
            online=True,
            device_id=self.device_id,
            agent_version=SIM_VERSION,
            started_at=self.started_at,
            capabilities=Capabilities(
                backends=self.profile.backends,
                models=list(self.profile.models),
                installed=[
                    InstalledModel(name=name, versions=[InstalledVersion(version=v) for v in versions])
                    for name, versions in sorted(self.installed.items())
                ],
                deliveries=list(self.deliveries),
            ),
            placement=PlacementStatus(
                generation=self.desired_generation,
                applied_generation=self.applied_generation,
                tenants=tenants,
            ),
            errors=list(self.errors),
            tags=dict(self.tags),
        )

    def _capacity(self, spec: TenantSpec) -> float:
        base = self.profile.speed.get(f"{spec.backend}:{spec.device.lower()}", 20.0)
        return base / MODEL_COST.get(spec.model, 1.0) * spec.instances**0.8

    def telemetry(self, interval_s: float) -> Telemetry:
        rows = []
        for t in self.tenants.values():
            # A random walk pulled back to where it started: cameras vary, they do not drift away
            # (an unbounded walk saturates devices after a few minutes and every latency doubles).
            t.base_fps = t.base_fps or t.demand_fps
            walk = t.demand_fps * self.rng.uniform(0.95, 1.05) + 0.2 * (t.base_fps - t.demand_fps)
            t.demand_fps = min(120.0, max(1.0, walk))
            capacity = self._capacity(t.spec)
            offered = t.demand_fps * interval_s
            served = min(offered + t.queue, capacity * interval_s)
            t.queue = max(0.0, t.queue + offered - served)
            if t.queue > QUEUE_LIMIT:
                t.drops += int(t.queue - QUEUE_LIMIT)
                t.queue = QUEUE_LIMIT
            t.frames_in += round(offered)
            t.frames_out += round(served)
            if self.rng.random() < 0.002:
                t.errors += 1
            if self._fault("errors", t.spec) is not None:  # fractions carried: a slow camera errs too
                t.error_debt += served * FAULT_ERROR_SHARE
                t.errors += int(t.error_debt)
                t.error_debt -= int(t.error_debt)
            service_ms = 1000.0 / capacity * t.spec.instances
            wait_ms = t.queue / capacity * 1000.0
            p50 = service_ms + wait_ms
            slow = self._fault("slow", t.spec)
            if slow is not None:
                p50 *= slow.factor
            rows.append(
                TenantTelemetry(
                    model=t.spec.model,
                    backend=t.spec.backend,
                    device=t.spec.device,
                    instances=t.spec.instances,
                    state=t.state,
                    frames_in=t.frames_in,
                    frames_out=t.frames_out,
                    errors=t.errors,
                    drops=t.drops,
                    fps=round(served / interval_s * self.rng.uniform(0.97, 1.03), 2),
                    latency_ms=Percentiles(
                        p50=round(p50, 2),
                        p95=round(p50 * self.rng.uniform(1.3, 1.6), 2),
                        p99=round(p50 * self.rng.uniform(1.7, 2.2), 2),
                    ),
                    queue_depth=int(t.queue),
                    batch_size_mean=1.0,
                )
            )
        load = sum(r.fps / self._capacity(t.spec) for r, t in zip(rows, self.tenants.values(), strict=True))
        return Telemetry(
            device_id=self.device_id,
            interval_s=interval_s,
            tenants=rows,
            device=DeviceTelemetry(
                cpu_percent=round(min(100.0, 5 + 60 * load) * self.rng.uniform(0.9, 1.1), 1),
                rss_mb=round(180 + 90 * len(rows) + self.rng.uniform(-5, 5), 1),
                temperature_c=round(45 + 20 * min(load, 1.0) + self.rng.uniform(-1, 1), 1),
                load_1m=round(0.2 + 2 * load, 2),
            ),
        )


class _Connection:
    """One MQTT connection publishing for a group of simulated devices."""

    def __init__(self, sim: FleetSimulator, index: int, devices: list[SimDevice]) -> None:
        self.sim = sim
        self.devices = {d.device_id: d for d in devices}
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-sim-{sim.run_id}-{index}",
            protocol=paho.MQTTv5,
        )
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.connected = threading.Event()
        self.qos1_sent = 0  # QoS 1 publishes handed to paho, and those the broker acknowledged
        self.qos1_acked = 0

    def _on_publish(self, *_: object) -> None:
        self.qos1_acked += 1  # paho's network thread; QoS 0 publishes are not sent with telemetry_qos 1

    def _on_connect(self, client: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("simulator connection refused: %s", reason)
            return
        topics = [(d.topics.placement, 1) for d in self.devices.values()]
        topics += [(d.topics.models, 1) for d in self.devices.values()]
        for start in range(0, len(topics), 100):
            client.subscribe(topics[start : start + 100])
        with self.sim.lock:
            self.sim.dirty.update(self.devices)  # (re)publish every retained status
        self.connected.set()

    def _on_message(self, _c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        parsed = parse_device_topic(message.topic)
        device = self.devices.get(parsed[0]) if parsed is not None else None
        if device is None:
            return
        device_id = device.device_id
        with self.sim.lock:
            if device.offline:
                return  # an offline device hears nothing; the retained placement waits for it
            if parsed is not None and parsed[1] == "models":
                device.deliver(bytes(message.payload), time.time())
            else:
                device.apply(bytes(message.payload), time.time())
                self.sim.placements_seen += 1
            self.sim.dirty.add(device_id)


class FleetSimulator:
    """Run `devices` simulated agents against a broker from a background thread (or `run()`)."""

    def __init__(
        self,
        host: str,
        port: int,
        devices: int,
        *,
        interval_s: float = 2.0,
        per_connection: int = 100,
        id_prefix: str = "sim",
        seed: int = 1,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        telemetry_qos: int = 0,
        versions: dict[str, list[str]] | None = None,
        faults: tuple[SimFault, ...] = (),
    ) -> None:
        """`versions`: model -> versions every device has installed (newest first); `faults`: see
        SimFault."""
        self.host, self.port = host, port
        # Agents publish telemetry at QoS 1; 0 is cheaper for a live view. At 1, stop() waits for
        # every telemetry publish to be acknowledged by the broker (a count to check storage against).
        self.telemetry_qos = telemetry_qos
        self.interval_s = interval_s
        self.run_id = f"{id_prefix}-{random.randrange(1 << 30):x}"
        rng = random.Random(seed)
        width = max(4, len(str(devices)))
        self.devices = [
            SimDevice(f"{id_prefix}-{i:0{width}d}", PROFILES[i % len(PROFILES)], random.Random(rng.random()))
            for i in range(devices)
        ]
        now = time.time()
        for i, device in enumerate(self.devices):  # spread telemetry evenly over the interval
            device.next_telemetry = now + interval_s * i / max(1, devices)
            device.tags = {"site": SITES[i % len(SITES)], "hw": device.profile.name}
            # Like the agent's bundled models (docs/fleet.md#versions): version 1.0.0 of each.
            given = versions or {}
            device.installed = {m: list(given.get(m, [BUNDLED_VERSION])) for m in device.profile.models}
            device.faults = tuple(faults)
        groups = [self.devices[i : i + per_connection] for i in range(0, devices, per_connection)]
        self.connections = [_Connection(self, i, g) for i, g in enumerate(groups)]
        self.by_id = {d.device_id: c for c in self.connections for d in c.devices.values()}
        self.device_map = {d.device_id: d for d in self.devices}
        for conn in self.connections:
            if username:
                conn.client.username_pw_set(username, password)
            if tls_context is not None:  # a secured broker (mqtts://, docs/security.md)
                conn.client.tls_set_context(tls_context)
        self.lock = threading.Lock()
        self.dirty: set[str] = set()
        self.telemetry_sent = 0
        self.status_sent = 0
        self.placements_seen = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def connect(self, timeout_s: float = 30.0) -> None:
        for conn in self.connections:
            conn.client.connect_async(self.host, self.port, keepalive=30)
            conn.client.loop_start()
        deadline = time.monotonic() + timeout_s
        for conn in self.connections:
            if not conn.connected.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"simulator could not connect to {self.host}:{self.port}")

    def start(self) -> FleetSimulator:
        self.connect()
        self._thread = threading.Thread(target=self.run, name="fleet-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, clear: bool = False) -> None:
        """Publish every device offline (or clear its retained topics), then disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
        infos = []
        for device in self.devices:
            conn = self.by_id[device.device_id]
            if clear:
                infos.append(conn.client.publish(device.topics.status, b"", qos=1, retain=True))
                infos.append(conn.client.publish(device.topics.placement, b"", qos=1, retain=True))
            else:
                offline = Status(online=False, device_id=device.device_id).model_dump_json(
                    include={"online", "device_id"}
                )
                infos.append(conn.client.publish(device.topics.status, offline.encode(), qos=1, retain=True))
        for info in infos:
            if info.rc == paho.MQTT_ERR_SUCCESS:
                info.wait_for_publish(5.0)
        if self.telemetry_qos:
            deadline = time.monotonic() + 60.0
            for conn in self.connections:  # every telemetry publish acknowledged by the broker
                while conn.qos1_acked < conn.qos1_sent and time.monotonic() < deadline:
                    time.sleep(0.05)
        for conn in self.connections:
            conn.client.disconnect()
            conn.client.loop_stop()

    def set_online(self, device_id: str, online: bool) -> None:
        """Take a device off the network (its status says offline, it hears nothing) or bring it
        back (it subscribes again and so gets its retained placement, as a reconnecting agent)."""
        device = self.device_map[device_id]
        conn = self.by_id[device_id]
        with self.lock:
            device.offline = not online
            if online:
                self.dirty.add(device_id)
        if online:
            conn.client.subscribe([(device.topics.placement, 1), (device.topics.models, 1)])
        else:
            offline = Status(online=False, device_id=device_id).model_dump_json(
                include={"online", "device_id"}
            )
            conn.client.publish(device.topics.status, offline.encode(), qos=1, retain=True)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        """Publish due telemetry and changed statuses every 20 ms, until stop()."""
        while not self._stop.wait(0.02):
            self.step(time.time())

    def step(self, now: float) -> None:
        out: list[tuple[_Connection, str, bytes, int, bool]] = []
        with self.lock:
            for device in self.devices:
                if device.tick(now):
                    self.dirty.add(device.device_id)
            for device_id in sorted(self.dirty):
                device = self.device_map[device_id]
                if device.offline:
                    continue
                out.append(
                    (
                        self.by_id[device_id],
                        device.topics.status,
                        device.status().model_dump_json().encode(),
                        1,
                        True,
                    )
                )
            self.status_sent += len(self.dirty)
            self.dirty.clear()
            for device in self.devices:
                if device.next_telemetry > now or device.offline:
                    continue
                device.next_telemetry += self.interval_s
                if device.next_telemetry < now:  # fell behind (a paused process): do not burst
                    device.next_telemetry = now + self.interval_s
                tel = device.telemetry(self.interval_s).model_dump_json().encode()
                out.append((self.by_id[device.device_id], device.topics.telemetry, tel, -1, False))
                self.telemetry_sent += 1
        for conn, topic, payload, kind_qos, retain in out:
            qos = self.telemetry_qos if kind_qos == -1 else kind_qos  # -1: telemetry
            info = conn.client.publish(topic, payload, qos=qos, retain=retain)
            if qos and info.rc == paho.MQTT_ERR_SUCCESS:
                conn.qos1_sent += 1

    def expected_rate(self) -> float:
        return len(self.devices) / self.interval_s if self.interval_s > 0 else math.inf

"""Agent configuration: TOML file, then `EDGE_AGENT_*` environment, then command-line flags.

Validated once at start (`extra="forbid"`, no I/O in validators); a bad config is one clear
`ConfigError` that the CLI turns into exit code 2.
"""

from __future__ import annotations

import contextvars
import importlib.util
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.protocol.broker import BrokerUrlError, redact_url
from agent.protocol.broker import parse_broker_url as parse_address
from agent.protocol.schemas import Placement, TenantSpec
from agent.protocol.topics import (
    DEVICE_ID_RE,
    filters_overlap,
    tag_problem,
    valid_device_id,
    valid_model_name,
)
from agent.service.errors import AgentError

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


def bundled_models_dir() -> Path:
    """The model repository that ships with the agent.

    In a checkout (or /opt/edge-agent/src) it sits beside the package; an installed wheel carries it
    as the package data of `edge_agent_models` (pyproject maps models/ to that name).
    """
    beside = Path(__file__).resolve().parents[2] / "models"
    if beside.is_dir():
        return beside
    spec = importlib.util.find_spec("edge_agent_models")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return beside


BUNDLED_MODELS_DIR = bundled_models_dir()

_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("toml_path", default=None)


class ConfigError(AgentError):
    """The configuration cannot be used; the message says what to fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(Section):
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Skip hostname verification (self-signed lab brokers). Never the default.
    insecure: bool = False


class BrokerConfig(Section):
    host: str = "localhost"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: TlsConfig = Field(default_factory=TlsConfig)
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    topic_prefix: str = Field(default="edge", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    client_id: str | None = None
    # Persistent MQTT 5 session: frames published at QoS 1 while the agent is away wait at the broker.
    session_expiry_s: int = Field(default=3600, ge=0)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    # "auto": MQTT 5, and 3.1.1 when the broker refuses 5 (said once in the log and in status).
    # MQTT 5-only features (response topic, correlation data, user properties, message expiry,
    # session expiry, Receive Maximum) are not available over 3.1.1 (docs/protocol.md).
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    # 2: results (and the frames subscription) at QoS 2, for consumers that must see each answer once
    # even across broker restarts; costs a second round trip per result (docs/reliability.md).
    results_qos: Literal[1, 2] = 1
    # MQTT 5 Receive Maximum: QoS 1/2 frames the broker may send before the agent acknowledged them.
    # The agent acknowledges a frame as soon as it is queued (or answered `overloaded`), so a wide
    # window moves a burst from the broker's queue, where frames are dropped unanswered, to the agent,
    # where each gets an answer. Measured (bench/burst.py, 6000-frame bursts, Mosquitto's default
    # queue of 1000): 0-89 frames dropped at 65535, 64-929 at 1000, 222-849 at 20.
    receive_maximum: int = Field(default=65535, ge=1, le=65535)
    # Nodes of one broker cluster, `["mqtt://a:1883", "mqtt://b:1883"]`: set, they replace host and
    # port (the first is tried first); when the node the agent is on goes down it moves to the next,
    # and says which it is on (status `mqtt_broker`; docs/operations.md#broker-clusters).
    nodes: list[str] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _nodes(self) -> BrokerConfig:
        if not self.nodes:
            return self
        addresses = []
        for url in self.nodes:
            try:
                address = parse_address(url)
            except BrokerUrlError as exc:
                raise ValueError(f"nodes: {exc}") from exc
            if address.username or address.password:
                raise ValueError(f"nodes: {redact_url(url)!r}: put credentials in username and password")
            addresses.append(address)
        if len({a.tls for a in addresses}) > 1:
            raise ValueError("nodes: all mqtt:// or all mqtts:// (one cluster, one TLS setting)")
        self.host, self.port = addresses[0].host, addresses[0].port
        if addresses[0].tls:
            self.tls.enabled = True
        return self

    def addresses(self) -> list[tuple[str, int]]:
        """Where to connect, in order: the nodes, or the one host and port."""
        if not self.nodes:
            return [(self.host, self.port)]
        return [(a.host, a.port) for a in map(parse_address, self.nodes)]


class IngestConfig(Section):
    max_payload_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Decoded pixel budget per frame; anything above is refused before decoding (image bombs).
    max_pixels: int = Field(default=40_000_000, ge=1024)
    default_model: str = "efficientnet-lite0"
    top_k: int = Field(default=5, ge=1, le=100)
    # Frames sent again with the same request id (a broker's redelivery, a camera's retry) are not
    # run again for this long after they arrived (0: off). The broker redelivers at most a session
    # expiry after the first delivery (broker.session_expiry_s, 3600 s by default).
    dedup_window_s: float = Field(default=3600.0, ge=0)
    # At most this many remembered ids (about 1 KB each with the answer).
    dedup_entries: int = Field(default=20_000, ge=0, le=1_000_000)


class SchedulerConfig(Section):
    queue_depth: int = Field(default=64, ge=1, le=100_000)
    overload_policy: Literal["drop_oldest", "reject_new"] = "drop_oldest"
    drain_timeout_s: float = Field(default=10.0, ge=0)
    # A batch whose runtime call has not returned after this long is answered `internal` and its
    # instance taken out of service until the call returns (a hung accelerator). Far above any
    # real batch: a batch of 8 lite0 frames takes ~54 ms on one core of the 2-core test machine.
    infer_timeout_s: float = Field(default=60.0, gt=0)
    # Loading a tenant (compile, engine build, warm-up) that takes longer is abandoned: the tenant is
    # `failed` and the current placement keeps serving. Generous: a TensorRT engine build on a
    # Jetson takes minutes.
    load_timeout_s: float = Field(default=600.0, gt=0)
    # "batch": the agent's threads run under Linux SCHED_BATCH, so a thread that wakes (the event
    # loop on each packet, a worker) does not preempt a runtime thread mid-inference; the loop
    # then serves several packets per wake-up. Measured in docs/performance.md ("Where a frame's
    # time goes"): less CPU per frame, more throughput, a few ms more latency under full load.
    cpu_policy: Literal["normal", "batch"] = "normal"


class MetricsConfig(Section):
    retention_hours: float = Field(default=72.0, gt=0)
    # metrics.db is also bounded by size (an SD card at 30 fps would fill ~1.5 GB in 72 h): above
    # this, the oldest rows go first. About 12 h of rows at 30 fps per 256 MB.
    max_db_mb: float = Field(default=256.0, gt=0)
    flush_interval_s: float = Field(default=1.0, gt=0)
    telemetry_interval_s: float = Field(default=5.0, gt=0)
    # "127.0.0.1:9108" to serve Prometheus text format on /metrics; off by default.
    prometheus_listen: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:\[\]-]*:\d{1,5}$")


class FailoverConfig(Section):
    """Tenants with several candidates (docs/reliability.md, "Failover")."""

    # Runtime errors in a row that make the serving candidate unhealthy (a stall does at once).
    errors_to_fail: int = Field(default=3, ge=1, le=1000)
    # A tenant that has another candidate to move to calls a runtime call stalled after this long
    # (or scheduler.infer_timeout_s, if shorter): its frames then run on the next candidate.
    stall_timeout_s: float = Field(default=5.0, gt=0)
    # A better candidate that failed serves again once it has passed probes for this long (doubled
    # per failure in a row, up to backoff_max_s: a flapping device is not taken back at once).
    failback_after_s: float = Field(default=30.0, ge=0)
    # An unhealthy candidate is probed (one inference, while idle) this often, doubled per failure.
    probe_interval_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    # Slow drift: per-frame inference this many times the tenant's own baseline on the candidate
    # makes it unhealthy (make-before-break). 0 turns the check off.
    drift_factor: float = Field(default=5.0, ge=0)


class SecurityConfig(Section):
    # The placement signers' Ed25519 public keys: one key (base64 of 32 bytes, or a file holding keys,
    # one per line) or a list of them, at most 8: during a key rotation the device holds the old and
    # the new key. When set, only placements signed with a matching private key, recently, for a
    # newer generation are applied.
    placement_public_key: str | list[str] | None = None
    placement_max_age_s: float = Field(default=86400.0, gt=0)

    @field_validator("placement_public_key")
    @classmethod
    def _some_keys(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not 1 <= len(value) <= 8:
            raise ValueError("give 1 to 8 public keys (an empty list would accept unsigned placements)")
        if isinstance(value, str | list) and not all(
            k.strip() for k in ([value] if isinstance(value, str) else value)
        ):
            # An empty value from a template or an unset variable must not mean "unsigned is fine".
            raise ValueError("empty: give a public key, or leave the setting out to accept unsigned")
        return value


class ModelsConfig(Section):
    """`[models]`: model versions delivered by the console (docs/fleet.md)."""

    # Where delivered versions are installed (None: <state_dir>/models).
    dir: Path | None = None
    # The console's base URL (https://console:8080): artifacts are fetched from its host only.
    console_url: str | None = Field(default=None, pattern=r"^https?://[^/\s]+/?$")
    allow_hosts: list[str] = Field(default_factory=list, max_length=16)  # other artifact hosts allowed
    token: str | None = None  # a console API token (bearer), if the console asks for one
    ca_file: Path | None = None  # the console's CA (https)
    cert_file: Path | None = None  # the device's client certificate (https, where the console asks)
    key_file: Path | None = None
    # Versions kept beside those placed and the newest (older ones are removed after an install).
    keep_versions: int = Field(default=1, ge=0, le=100)
    max_artifact_mb: float = Field(default=4096.0, gt=0)
    min_free_mb: float = Field(default=200.0, ge=0)  # left free on the disk after a download
    timeout_s: float = Field(default=30.0, gt=0, le=600)


class HomeAssistantConfig(Section):
    """Home Assistant MQTT discovery (docs/home-assistant.md); off unless enabled."""

    enabled: bool = False
    # HA's discovery prefix (its MQTT integration's setting; "homeassistant" by default).
    discovery_prefix: str = Field(default="homeassistant", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # How often each tenant's throughput, latency and counters are published for HA.
    state_interval_s: float = Field(default=5.0, ge=1.0)


class InputConfig(Section):
    """`[[inputs]]`: frames on other topics (a camera's or Frigate's snapshots) served by a model;
    answered on the result topic with `source_topic` naming where the frame came from."""

    topic: str = Field(min_length=1, max_length=256, description="an MQTT topic filter (+ and # allowed)")
    model: str
    qos: Literal[0, 1, 2] = 1

    @field_validator("topic")
    @classmethod
    def _filter(cls, value: str) -> str:
        levels = value.split("/")
        if any(("+" in lvl and lvl != "+") or ("#" in lvl and lvl != "#") for lvl in levels) or (
            "#" in levels[:-1]
        ):
            raise ValueError("not a valid MQTT topic filter")
        if value in ("#", "+/#") or value.startswith("$"):
            raise ValueError("too wide: it would take in every message (the agent's own too)")
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if not valid_model_name(value):
            raise ValueError("not a valid model name")
        return value


class FrigateConfig(Section):
    """Serve as Frigate's `zmq` detector (agent/frigate/, docs/frigate.md); off unless enabled."""

    enabled: bool = False
    # ROUTER sockets bound here; Frigate's REQ sockets connect (ipc:// paths or tcp://host:port).
    endpoints: list[str] = Field(
        default_factory=lambda: ["ipc:///tmp/cache/zmq_detector"], min_length=1, max_length=8
    )
    # Frigate's model file name (the base name of its `model.path`) -> the repository model serving it.
    models: dict[str, str] = Field(default_factory=dict, max_length=64)
    # Serves any other model name Frigate asks for (none: an unknown name asks Frigate for the file).
    default_model: str | None = None
    # The class ids answered: "coco91" (Frigate's default labelmap.txt), "coco80", or a labelmap file.
    labelmap: str = "coco91"
    # Frigate's request_timeout_ms: a request still queued past it is not run (no one waits for it).
    request_timeout_ms: int = Field(default=200, ge=10, le=600_000)
    # How long a handshake waits for the model's tenant to be ready (Frigate waits 30 s for it).
    handshake_wait_s: float = Field(default=20.0, ge=0, le=29)
    max_model_mb: float = Field(default=512.0, gt=0)  # a model file Frigate sends, at most
    # A model file Frigate sends (ssd or yologeneric ONNX) is installed and placed on this backend
    # and device (docs/frigate.md#models-frigate-sends); false: saved, never run.
    accept_models: bool = True
    transferred_backend: str = "onnxruntime"
    transferred_device: str = "CPU"

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for endpoint in value:
            if not re.fullmatch(r"(ipc://.+|tcp://[^\s]+:\d{1,5})", endpoint):
                raise ValueError(f"{endpoint!r}: an ipc:///path or tcp://host:port endpoint")
        return value

    @model_validator(mode="after")
    def _model_names(self) -> FrigateConfig:
        for name in [*self.models.values(), *([self.default_model] if self.default_model else [])]:
            if not valid_model_name(name):
                raise ValueError(f"{name!r} is not a valid model name")
        return self


def _default_placement() -> Placement:
    return Placement(generation=0, tenants=[TenantSpec(model="efficientnet-lite0")])


def _hostname_device_id() -> str:
    """The hostname, made into a valid device id (dots and other characters become '-')."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:64]
    return name or "edge-device"


class AgentConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGE_AGENT_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    device_id: str = Field(default_factory=_hostname_device_id)
    state_dir: Path = DEFAULT_STATE_DIR
    models_dir: Path = BUNDLED_MODELS_DIR
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Reported in status; the console's selectors pick devices by them (docs/fleet.md#tags).
    tags: dict[str, str] = Field(default_factory=dict, max_length=32)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    homeassistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    inputs: list[InputConfig] = Field(default_factory=list, max_length=64)
    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    frigate: FrigateConfig = Field(default_factory=FrigateConfig)
    # Fault injection for chaos tests (agent/frames/faults.py, docs/reliability.md): off unless set, e.g.
    # EDGE_AGENT_FAULTS="openvino:CPU:hang:after=200". Several are separated by commas.
    faults: str = ""
    # What to serve before (or without) a placement from the console.
    placement: Placement = Field(default_factory=_default_placement)

    @model_validator(mode="after")
    def _inputs_apart(self) -> AgentConfig:
        own = f"{self.broker.topic_prefix}/{self.device_id}/"
        seen: set[str] = set()
        for item in self.inputs:
            if item.topic in seen:
                raise ValueError(f"inputs: topic {item.topic!r} listed twice")
            clash = next((other for other in seen if filters_overlap(item.topic, other)), None)
            if clash is not None:
                raise ValueError(
                    f"inputs: {item.topic!r} overlaps {clash!r} (a frame on a topic both match would "
                    "be served twice): make the filters disjoint"
                )
            seen.add(item.topic)
            # Everything under the agent's own prefix (frames, answers, status, Home Assistant
            # states) and HA's discovery configs: taken in, they would be served as frames.
            for mine in (own + "#", f"{self.homeassistant.discovery_prefix}/#"):
                if filters_overlap(item.topic, mine):
                    raise ValueError(f"inputs: {item.topic!r} would overlap the agent's own topics ({mine})")
        return self

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        for key, tag in value.items():
            problem = tag_problem(key, tag)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not valid_device_id(value):
            raise ValueError(f"must match {DEVICE_ID_RE.pattern}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @property
    def versions_dir(self) -> Path:
        """Where delivered model versions are installed (docs/fleet.md)."""
        return self.models.dir or self.state_dir / "models"

    @property
    def metrics_db(self) -> Path:
        return self.state_dir / "metrics.db"


def parse_broker_url(url: str) -> dict[str, Any]:
    """`--broker URL` as config overrides (agent.protocol.broker parses it; the scheme decides TLS,
    also against a config file that enables it: its CA and certificate stay). Several URLs, comma
    separated, are the nodes of one cluster (`broker.nodes`); one URL replaces the file's nodes."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    try:
        address = parse_address(urls[0] if urls else url)
        others = [parse_address(u) for u in urls[1:]]
    except BrokerUrlError as exc:
        raise ConfigError(f"--{exc}") from exc
    out: dict[str, Any] = {"host": address.host, "port": address.port, "tls": {"enabled": address.tls}}
    if others:
        out["nodes"] = [
            f"{'mqtts' if a.tls else 'mqtt'}://{_netloc(a.host, a.port)}" for a in [address, *others]
        ]
    if address.username:
        out["username"] = address.username
    if address.password:
        out["password"] = address.password
    return out


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    broker_url: str | None = None,
) -> AgentConfig:
    """Build the config: flags (`overrides`, `broker_url`) > environment > TOML file > defaults."""
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
        try:
            tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    init: dict[str, Any] = {k: v for k, v in (overrides or {}).items() if v is not None}
    if broker_url:
        # Flags win over the file, but keep the file's other broker settings (credentials, TLS files).
        file_broker = tomllib.loads(path.read_text()).get("broker", {}) if path else {}
        file_broker.pop("nodes", None)  # the flag's address, or its nodes, replace the file's nodes
        init["broker"] = _merge(file_broker, {"nodes": [], **parse_broker_url(broker_url)})
    token = _toml_path.set(path)
    try:
        return AgentConfig(**init)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration{where}: {problems}") from exc
    finally:
        _toml_path.reset(token)

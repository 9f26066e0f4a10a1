"""Console configuration: a TOML file, then command-line flags.

Validated once at start (`extra="forbid"`, no I/O in validators); a bad file is one `ConsoleConfigError`
that the CLI turns into exit code 2. The console has its own config (it does not import the agent's):
it knows agents only through the wire contract (docs/protocol.md, package agent.protocol).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.protocol.broker import BrokerAddress, BrokerUrlError, redact_url
from agent.protocol.broker import parse_broker_url as parse_address

USER_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
Role = Literal["admin", "viewer"]


class ConsoleConfigError(Exception):
    """The configuration cannot be used; the message says what to fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserConfig(Section):
    """One login. `password_hash` comes from `edge-console hash-password` (argon2id; older scrypt
    hashes are still accepted and upgraded at the user's next login)."""

    name: str
    password_hash: str = Field(pattern=r"^(scrypt\$|\$argon2id\$)")
    role: Role = "viewer"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not USER_NAME_RE.fullmatch(value):
            raise ValueError(f"must match {USER_NAME_RE.pattern}")
        return value


class BrokerSettings(Section):
    url: str = "mqtt://localhost:1883"
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    # TLS (an mqtts:// URL): the CA that signed the broker's certificate (default: the system's), and
    # the console's own client certificate and key for a broker that requires them (mutual TLS).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # Skip hostname verification (self-signed lab brokers). Never the default.
    tls_insecure: bool = False
    # MQTT version: "auto" tries 5 and falls back to 3.1.1 when the broker refuses it (as agents do).
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    # Nodes of one broker cluster, `["mqtt://a:1883", "mqtt://b:1883"]`: set, they replace `url`
    # (the first is tried first); when the node the console is on goes down it moves to the next,
    # as agents do (docs/operations.md#broker-clusters). Credentials go in username and password.
    nodes: list[str] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _nodes(self) -> BrokerSettings:
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
        return self

    def addresses(self) -> list[BrokerAddress]:
        """Where to connect, in order: the nodes, or the one `url` (credentials: `url`'s, or the
        username and password settings, as `agent.protocol.broker.credentials` decides)."""
        if not self.nodes:
            return [parse_broker_url(self.url)]
        return [parse_broker_url(url) for url in self.nodes]


class SigningSettings(Section):
    """The console's placement signing key: every placement it publishes is signed (Ed25519) so
    devices with `[security] placement_public_key` accept it. Unset: placements go out unsigned."""

    key_file: Path | None = None
    # How long a published placement stays valid: a device offline longer refuses it as expired
    # (a newer placement is then needed). At most the devices' `placement_max_age_s` (default 1 day).
    valid_s: float = Field(default=86400.0, gt=0, le=30 * 86400)


class WebSettings(Section):
    listen: str = "127.0.0.1:8080"
    # Signs session cookies. Unset: a random one per start (everyone logs in again after a restart).
    # Set the same value on every console worker behind one load balancer.
    session_secret: str | None = Field(default=None, min_length=16)
    session_max_age_s: int = Field(default=12 * 3600, ge=60)
    # Mark the cookie Secure: set this when the console is served over HTTPS (a reverse proxy).
    secure_cookies: bool = False


class StorageSettings(Section):
    # The embedded default: one SQLite file (one console process).
    db: Path = Path("console.db")
    # PostgreSQL for several console processes on one fleet: "postgresql://USER:PASSWORD@HOST/NAME"
    # (docs/operations.md#postgresql). Set, it replaces `db`.
    database: str | None = Field(default=None, pattern=r"^(postgres(ql)?(\+psycopg)?|sqlite)://")
    retention_hours: float = Field(default=24.0, gt=0)
    # Raw telemetry older than this becomes one row per device, tenant and bucket (None: never).
    downsample_after_hours: float | None = Field(default=2.0, gt=0)
    downsample_bucket_s: float = Field(default=60.0, ge=10, le=3600)
    # At most this many telemetry rows (and as many host rows): the oldest go first (None: no bound).
    max_telemetry_rows: int | None = Field(default=5_000_000, ge=1000)
    flush_interval_s: float = Field(default=1.0, gt=0)
    # Uploaded model files (docs/fleet.md); their records are in the database. Default: the
    # `model-store` folder beside `db`. Several processes must share this folder.
    model_store: Path | None = None

    def url(self) -> str:
        """Where the console's database is: `database`, else the `db` file."""
        return self.database or str(self.db)

    def model_store_dir(self) -> Path:
        return self.model_store or self.db.resolve().parent / "model-store"


class ConsoleConfig(Section):
    topic_prefix: str = Field(default="edge", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    # MQTT 5 shared subscription group for telemetry ($share/<group>/edge/+/telemetry): several console
    # workers then split the fleet's telemetry. Status stays a plain subscription (it is retained).
    shared_group: str | None = Field(default=None, pattern=GROUP_RE.pattern)
    # A process of the group silent this long is taken for dead: another drains its MQTT session
    # (the telemetry it had not stored). Each process notes it is alive every quarter of this.
    shared_group_timeout_s: float = Field(default=20.0, ge=2.0, le=3600.0)
    # A device is shown "stale" when nothing arrived from it for this long while it claims online.
    stale_after_s: float = Field(default=30.0, gt=0)
    # ... and offline when nothing arrived for this long: on a broker cluster its last will may be
    # published on a node the console does not hear (docs/operations.md#broker-clusters).
    offline_after_s: float = Field(default=90.0, gt=0)
    # How devices reach this console (model downloads, docs/fleet.md); None: the URL of the request
    # that asked for the delivery.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^/\s]+/?$")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    signing: SigningSettings = Field(default_factory=SigningSettings)
    users: list[UserConfig] = Field(default_factory=list)

    @field_validator("users")
    @classmethod
    def _unique_users(cls, users: list[UserConfig]) -> list[UserConfig]:
        names = [u.name for u in users]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"user names appear twice: {', '.join(dupes)}")
        return users


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host:port`, `mqtts://host:port` or `host:port` -> where to connect (the agent's parser)."""
    try:
        return parse_address(url)
    except BrokerUrlError as exc:
        raise ConsoleConfigError(str(exc)) from exc


def broker_flag(value: str) -> dict[str, object]:
    """`--broker URL` as broker settings: one URL is `url`; several, comma separated, are the nodes of
    one cluster (`nodes`; the first URL's credentials become username and password), as the
    agent's `--broker a,b`."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if len(urls) <= 1:
        return {"url": urls[0] if urls else value, "nodes": []}
    addresses = [parse_broker_url(u) for u in urls]
    first = addresses[0]
    nodes = [f"{'mqtts' if a.tls else 'mqtt'}://{_netloc(a.host, a.port)}" for a in addresses]
    out: dict[str, object] = {"url": nodes[0], "nodes": nodes}
    if first.username:
        out["username"] = first.username
    if first.password:
        out["password"] = first.password
    return out


def broker_shown(settings: BrokerSettings) -> str:
    """The broker, or the nodes of the cluster, as a log line shows them (no password)."""
    return ",".join(settings.nodes) if settings.nodes else redact_url(settings.url)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConsoleConfigError(f"listen address {listen!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port_text)


def load_console_config(path: Path | None) -> ConsoleConfig:
    """Read and validate the TOML file (or defaults when no file is given)."""
    if path is None:
        return ConsoleConfig()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConsoleConfigError(f"config file {path}: {exc}") from exc
    try:
        return ConsoleConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise ConsoleConfigError(f"invalid configuration in {path}: {problems}") from exc

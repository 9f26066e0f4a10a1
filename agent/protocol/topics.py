"""Every MQTT topic of the wire contract (docs/protocol.md), built and parsed in one place."""

from __future__ import annotations

import re

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# A model version: a folder name on the device, so no `/`, and `..` is refused by valid_version.
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
# A device pool's name (docs/pools.md): a topic level and a shared subscription's group name.
POOL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Device tags (docs/fleet.md#tags): a key and a value, e.g. site = "north".
TAG_KEY_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
TAG_VALUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")
DEFAULT_PREFIX = "edge"


def valid_device_id(device_id: str) -> bool:
    return bool(DEVICE_ID_RE.fullmatch(device_id))


def valid_model_name(name: str) -> bool:
    return bool(MODEL_NAME_RE.fullmatch(name)) and ".." not in name


def tag_problem(key: str, value: str) -> str | None:
    """Why a tag is not valid, or None (the agent config and the console check the same)."""
    if not TAG_KEY_RE.fullmatch(key):
        return f"tag name {key!r} must match {TAG_KEY_RE.pattern}"
    if key == "id":
        return "tag name 'id' is the device id in selectors; choose another"
    if not TAG_VALUE_RE.fullmatch(value):
        return f"tag {key} value {value!r} must match {TAG_VALUE_RE.pattern}"
    return None


def valid_version(version: str) -> bool:
    return bool(VERSION_RE.fullmatch(version)) and ".." not in version


def tenant_key(model: str, version: str | None) -> str:
    """What a frame names to reach a tenant (docs/protocol.md "Two versions side by side"): the
    model name for a tenant that follows the newest version, `name@version` for a pinned one."""
    return model if version is None else f"{model}@{version}"


def split_key(key: str) -> tuple[str, str | None]:
    """A frame's `model` as (name, version): `name@version` pins one version, `name` asks for the
    model's default tenant."""
    name, sep, version = key.partition("@")
    return name, (version if sep else None)


def valid_tenant_key(key: str) -> bool:
    name, version = split_key(key)
    return valid_model_name(name) and (version is None or valid_version(version))


# Mosquitto's count of publishes it dropped (queue and in-flight limits), published every sys_interval.
BROKER_DROPPED = "$SYS/broker/publish/messages/dropped"


class Topics:
    """Topic names for one device; `prefix` is `edge` unless configured otherwise."""

    def __init__(self, device_id: str, prefix: str = DEFAULT_PREFIX) -> None:
        if not valid_device_id(device_id):
            raise ValueError(f"device id {device_id!r} must match {DEVICE_ID_RE.pattern}")
        self.device_id = device_id
        self.prefix = prefix
        self.base = f"{prefix}/{device_id}"

    @property
    def infer(self) -> str:
        return f"{self.base}/infer"

    @property
    def infer_any_model(self) -> str:
        """Subscription filter for `edge/<id>/infer/<model>`."""
        return f"{self.base}/infer/+"

    def infer_model(self, model: str) -> str:
        return f"{self.base}/infer/{model}"

    @property
    def result(self) -> str:
        return f"{self.base}/result"

    @property
    def placement(self) -> str:
        return f"{self.base}/placement"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def events(self) -> str:
        """Announcements not kept as state (a tenant moving between candidates)."""
        return f"{self.base}/events"

    @property
    def models(self) -> str:
        """Model deliveries for this device: the console's manifest of what to fetch (docs/fleet.md)."""
        return f"{self.base}/models"

    def model_from_topic(self, topic: str) -> str | None:
        """The `<model>` suffix of an infer topic, or None for the plain infer topic."""
        head = self.infer + "/"
        return topic[len(head) :] if topic.startswith(head) else None


def valid_pool_name(name: str) -> bool:
    return bool(POOL_NAME_RE.fullmatch(name))


class PoolTopics:
    """Topics of one device pool (docs/pools.md): `<prefix>/pool/<name>/...`. Five levels for frames,
    so no device topic (`<prefix>/<id>/infer[/<model>]`, at most four) ever matches a pool's."""

    def __init__(self, name: str, prefix: str = DEFAULT_PREFIX) -> None:
        if not valid_pool_name(name):
            raise ValueError(f"pool name {name!r} must match {POOL_NAME_RE.pattern}")
        self.name = name
        self.prefix = prefix
        self.base = f"{prefix}/pool/{name}"

    def infer(self, model: str) -> str:
        """Where a camera sends the pool's frames for `model`."""
        return f"{self.base}/infer/{model}"

    def share(self, model: str) -> str:
        """A member's shared subscription: the broker hands each frame to one member of the group."""
        return f"$share/{self.name}/{self.infer(model)}"

    @property
    def infer_any_model(self) -> str:
        return f"{self.base}/infer/+"

    @property
    def result(self) -> str:
        """Every member's answers (MQTT 3.1.1 cameras read them here; members learn served ids)."""
        return f"{self.base}/result"

    @property
    def members(self) -> str:
        """Members announce whether they take frames (back-pressure) and how full they are."""
        return f"{self.base}/members"

    def reply(self, user: str, token: str) -> str:
        """An MQTT 5 client's response topic for pool frames (docs/security.md, "Broker ACL")."""
        return f"{self.base}/reply/{user}/{token}"

    def model_from_topic(self, topic: str) -> str | None:
        head = f"{self.base}/infer/"
        return topic[len(head) :] if topic.startswith(head) else None


def parse_pool_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str] | None:
    """(pool, kind) of a pool's `<prefix>/pool/<pool>/<kind>` (result, members); None otherwise."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != prefix or parts[1] != "pool" or not valid_pool_name(parts[2]):
        return None
    return parts[2], parts[3]


def pool_filter(kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Wildcard filter over all pools, e.g. `edge/pool/+/members` (used by the console)."""
    return f"{prefix}/pool/+/{kind}"


def fleet_filter(kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Wildcard filter over all devices, e.g. `edge/+/status` (used by the console)."""
    return f"{prefix}/+/{kind}"


def parse_device_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str] | None:
    """(device id, kind) of a device's own topic `<prefix>/<id>/<kind>` (status, telemetry,
    placement, events...); None for any other topic. The inverse of `Topics(id, prefix).<kind>`."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != prefix or not valid_device_id(parts[1]) or not parts[2]:
        return None
    return parts[1], parts[2]


def filters_overlap(a: str, b: str) -> bool:
    """True when some topic matches both MQTT topic filters (a broker would deliver it for each, so
    a frame would be served twice). `#` matches its parent level too ("a/#" matches "a")."""
    left, right = a.split("/"), b.split("/")
    for i in range(max(len(left), len(right)) + 1):
        x = left[i] if i < len(left) else None
        y = right[i] if i < len(right) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return x is None and y is None
        if x != y and "+" not in (x, y):
            return False
    return True

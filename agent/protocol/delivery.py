"""The model delivery manifest (docs/fleet.md): what the console tells a device to fetch and install.

Published by the console on `edge/<id>/models`; signed like placements (agent/protocol/signing.py)
when the console signs, and then required to be signed by devices that hold a placement key.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.protocol.topics import MODEL_NAME_RE, VERSION_RE, valid_model_name, valid_version

# A file of a model folder: one plain name (no folders, no `..`), as a model version is installed flat.
FILE_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"


def valid_file_name(name: str) -> bool:
    """A file name of a delivered model: no `/`, no `..`, not hidden."""
    return bool(re.fullmatch(FILE_NAME_PATTERN, name)) and ".." not in name


class ArtifactRef(BaseModel):
    """One file of the version: where to get it, how large it is and its sha256."""

    model_config = ConfigDict(extra="forbid")

    name: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    url: str = Field(max_length=2048)

    @field_validator("name")
    @classmethod
    def _flat(cls, value: str) -> str:
        if not valid_file_name(value):
            raise ValueError(f"file name {value!r}: one plain name, no '/' or '..'")
        return value


class ModelDelivery(BaseModel):
    """Fetch these files, check them, install them as `model` version `version`."""

    model_config = ConfigDict(extra="forbid")

    model: str
    version: str
    artifacts: list[ArtifactRef] = Field(min_length=1, max_length=64)
    signed_at: float | None = None
    expires_at: float | None = None
    signature: str | None = Field(default=None, max_length=200)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if not valid_model_name(value):
            raise ValueError(f"model name must match {MODEL_NAME_RE.pattern}")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not valid_version(value):
            raise ValueError(f"version must match {VERSION_RE.pattern} (no '..')")
        return value

    @field_validator("artifacts")
    @classmethod
    def _unique(cls, artifacts: list[ArtifactRef]) -> list[ArtifactRef]:
        names = [a.name for a in artifacts]
        if len(set(names)) != len(names):
            raise ValueError("a file appears twice")
        if "model.toml" not in names:
            raise ValueError("model.toml is missing")
        return artifacts

    @property
    def total_bytes(self) -> int:
        return sum(a.size for a in self.artifacts)


# -- what the device reports (status `capabilities`, edge/<id>/events) --------------------------------
class InstalledVersion(BaseModel):
    """One installed version of a model: each file's sha256 as its manifest lists it."""

    version: str
    sha256: dict[str, str] = Field(default_factory=dict)


class InstalledModel(BaseModel):
    name: str
    versions: list[InstalledVersion] = Field(default_factory=list)  # newest first


DeliveryState = Literal["downloading", "installed", "failed"]


class DeliveryProgress(BaseModel):
    """A model delivery as the device sees it (status `capabilities.deliveries`, docs/fleet.md)."""

    model: str
    version: str
    state: DeliveryState
    bytes_done: int = 0
    bytes_total: int = 0
    error: str | None = None
    ts: float = Field(default_factory=time.time)


class DeliveryEvent(DeliveryProgress):
    """Published on edge/<id>/events when a delivery starts, installs or fails."""

    type: Literal["delivery"] = "delivery"
    device_id: str

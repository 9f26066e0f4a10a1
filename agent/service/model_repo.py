"""The model repository: one folder per model with `model.toml`, labels and artifacts.

Every path is resolved inside the repository (no `..`, no absolute paths, no symlinks that lead
out), and every artifact's sha256 is checked against the manifest before a backend sees it (an
OpenVINO IR's `.bin` weights too: `weights_sha256`).

A device may hold only the artifacts its accelerators use (a Coral box needs no `model.pt2`): an
artifact listed in the manifest but absent is simply not offered, and a backend that needs it
reports which one is missing. An artifact that is present but does not match is always refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.protocol.topics import MODEL_NAME_RE, valid_model_name
from agent.service.errors import AgentError
from backends.base import ModelArtifacts

log = logging.getLogger(__name__)


class ModelError(AgentError):
    """A model that cannot be served: unknown, malformed manifest, unsafe path or bad checksum."""


class _Missing(ModelError):
    """A file the manifest names is not there (fatal for labels, not for one artifact)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    size: tuple[int, int] = Field(description="(height, width)")
    dtype: Literal["float32", "uint8", "int8"] = "float32"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Fraction of the shorter side kept by the centre crop (ImageNet-style eval: 0.875).
    crop_fraction: float = Field(default=0.875, gt=0.0, le=1.0)
    # How the frame becomes the input size: "crop" (centre crop, classifiers), "stretch" (the whole
    # frame resized, aspect not kept) or "letterbox" (the whole frame, aspect kept, padded with
    # `pad`). Detectors see the whole frame; their boxes are mapped back to it (agent/frames/detection.py).
    resize: Literal["crop", "stretch", "letterbox"] = "crop"
    pad: float = Field(default=0.0, ge=0.0, le=255.0)


class ArtifactSpec(_Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="`sha256sum FILE`; any case")
    # An OpenVINO IR is two files: the listed `.xml` graph and its `.bin` weights beside it (same
    # name), whose sha256 this is. Required for an `.xml`, so that no weights load unverified.
    weights_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("sha256", "weights_sha256", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _weights(self) -> ArtifactSpec:
        is_ir = self.file.lower().endswith(".xml")
        if is_ir and self.weights_sha256 is None:
            raise ValueError(
                f"{self.file} is an OpenVINO IR: add weights_sha256 = `sha256sum` of "
                f"{Path(self.file).with_suffix('.bin').name}"
            )
        if not is_ir and self.weights_sha256 is not None:
            raise ValueError("weights_sha256 is for an OpenVINO IR (.xml) artifact only")
        return self

    @property
    def weights(self) -> str | None:
        """The IR's `.bin`, relative to the model folder (None for a one-file artifact)."""
        return str(Path(self.file).with_suffix(".bin")) if self.weights_sha256 else None

    # The artifact's own input layout when it differs from [input] (e.g. NHWC int8 TFLite for the
    # Edge TPU); the backend converts the agent's tensor to it.
    layout: Literal["NCHW", "NHWC"] | None = None
    dtype: Literal["float32", "float16", "uint8", "int8"] | None = None
    notes: str = ""


class DetectionSpec(_Strict):
    """How a detector's output becomes boxes (docs/detection.md)."""

    # "xyxy_score_class": one output (batch, N, 6) of x1, y1, x2, y2, score, class per row, the
    # graph having decoded its own boxes (CenterNet, SSD with its post-processing in the graph).
    decoder: Literal["xyxy_score_class"] = "xyxy_score_class"
    # Box units: pixels of the model input, or 0..1 of the model input.
    coordinates: Literal["input_pixels", "normalized"] = "input_pixels"
    score_threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    max_detections: int = Field(default=20, ge=1, le=1000)
    # Non-maximum suppression where the graph has none (None: no NMS); across classes when
    # class_agnostic_nms (one box reported as car and truck keeps its best class).
    nms_iou: float | None = Field(default=0.6, gt=0.0, le=1.0)
    class_agnostic_nms: bool = True


class Manifest(_Strict):
    name: str
    version: str = "0"
    task: Literal["classification", "detection"] = "classification"
    labels: str
    source: str = ""
    license: str = ""
    input: InputSpec
    detection: DetectionSpec | None = None
    artifacts: dict[str, ArtifactSpec]
    checks: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _detection_section(self) -> Manifest:
        if self.task == "detection" and self.detection is None:
            self.detection = DetectionSpec()
        if self.task != "detection" and self.detection is not None:
            raise ValueError('[detection] is for task = "detection" only')
        return self


@dataclass(frozen=True)
class Model:
    """A verified model, ready to hand to a backend."""

    manifest: Manifest
    root: Path
    labels: tuple[str, ...]
    artifacts: ModelArtifacts

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def input(self) -> InputSpec:
        return self.manifest.input


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._lock = threading.Lock()
        # (path, size, mtime_ns) -> sha256, so a model is hashed once per change, not per load.
        self._hashes: dict[tuple[str, int, int], str] = {}

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if valid_model_name(p.name) and ((p / "model.toml").is_file() or (p / "model.json").is_file())
        )

    def _inside(self, path: Path, what: str) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ModelError(f"{what} {path} leads outside the model repository")
        return resolved

    def _model_file(self, folder: Path, relative: str, what: str) -> Path:
        rel = Path(relative)
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelError(f"{what} path {relative!r} must be relative and inside the model folder")
        path = self._inside(folder / rel, what)
        if not path.is_relative_to(folder):
            raise ModelError(f"{what} path {relative!r} leads outside its model folder")
        if not path.is_file():
            raise _Missing(f"{what} {relative!r} is missing")
        return path

    def manifest(self, name: str) -> tuple[Path, Manifest]:
        """Parse a model's manifest without touching artifacts (cheap; for validation)."""
        if not valid_model_name(name):
            raise ModelError(f"model name {name!r} is not valid (must match {MODEL_NAME_RE.pattern})")
        folder = self._inside(self.root / name, "model folder")
        toml_path, json_path = folder / "model.toml", folder / "model.json"
        try:
            if toml_path.is_file():
                raw = tomllib.loads(self._inside(toml_path, "manifest").read_text())
            elif json_path.is_file():
                raw = json.loads(self._inside(json_path, "manifest").read_text())
            else:
                raise ModelError(f"unknown model {name!r} (available: {', '.join(self.names()) or 'none'})")
            manifest = Manifest.model_validate(raw)
        except (
            OSError,
            UnicodeDecodeError,
            tomllib.TOMLDecodeError,
            json.JSONDecodeError,
            ValidationError,
        ) as exc:
            raise ModelError(f"model {name!r}: bad manifest: {exc}") from exc
        if manifest.name != name:
            raise ModelError(f"model folder {name!r} holds a manifest named {manifest.name!r}")
        return folder, manifest

    def load(self, name: str, verify: bool = True) -> Model:
        """The verified model `name`. Blocking file I/O: call it from a worker thread."""
        folder, manifest = self.manifest(name)
        try:
            labels_path = self._model_file(folder, manifest.labels, "labels file")
            text = labels_path.read_text(encoding="utf-8")
        except ModelError as exc:
            raise ModelError(f"model {name!r}: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(
                f"model {name!r}: labels file {manifest.labels!r} unreadable (UTF-8 expected): {exc}"
            ) from exc
        labels = tuple(line.strip() for line in text.splitlines() if line.strip())
        files: dict[str, Path] = {}
        missing: dict[str, str] = {}
        for fmt, spec in manifest.artifacts.items():
            try:
                path = self._model_file(folder, spec.file, f"{fmt} artifact")
            except _Missing:
                missing[fmt] = spec.file  # not installed on this device
                continue
            checks = [(path, spec.file, spec.sha256)]
            if spec.weights is not None and spec.weights_sha256 is not None:
                try:
                    weights = self._model_file(folder, spec.weights, f"{fmt} weights")
                except _Missing as exc:  # an IR without its weights is broken, not absent
                    raise ModelError(f"model {name!r}: {exc} (beside {spec.file})") from exc
                checks.append((weights, spec.weights, spec.weights_sha256))
            if verify:
                for file, listed, expected in checks:
                    actual = self._sha256(file)
                    if actual != expected:
                        raise ModelError(
                            f"model {name!r}: {listed} sha256 {actual[:12]}... does not match the "
                            f"manifest ({expected[:12]}...); refusing to load it"
                        )
            files[fmt] = path
        if not files:
            listed = ", ".join(spec.file for spec in manifest.artifacts.values())
            raise ModelError(f"model {name!r}: none of its artifacts is present ({listed})")
        artifacts = ModelArtifacts(
            name=name,
            files=files,
            input_size=manifest.input.size,
            layout=manifest.input.layout,
            dtype=manifest.input.dtype,
            num_classes=len(labels),
            sha256={fmt: spec.sha256 for fmt, spec in manifest.artifacts.items()},
            layouts={fmt: spec.layout or manifest.input.layout for fmt, spec in manifest.artifacts.items()},
            missing=missing,
        )
        return Model(manifest=manifest, root=folder, labels=labels, artifacts=artifacts)

    def _sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._hashes.get(key)
        if cached is None:
            cached = sha256_file(path)
            with self._lock:
                self._hashes[key] = cached
        return cached

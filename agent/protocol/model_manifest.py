"""A model's manifest (`model.toml`): shared by the agent's repository and the console's model store,
which checks an upload the way `edge-agent models add` does before it accepts it (docs/fleet.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    # "ssd": one output (batch, 1, N, 7) of image_id, class, score, x1, y1, x2, y2 (the layout of
    # OpenVINO's and Caffe's DetectionOutput; an image_id below 0 ends the list).
    # "yolo": one output (batch, 4 + classes, N) or (batch, N, 4 + classes) of centre x, centre y,
    # width, height and a score per class (YOLOv8 and later exports, Frigate's "yologeneric").
    decoder: Literal["xyxy_score_class", "ssd", "yolo"] = "xyxy_score_class"
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

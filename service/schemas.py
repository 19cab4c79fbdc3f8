"""Request and response bodies: `XCreate` in, `XPublic` out, `XsPublic(data, count)` lists."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.backbones import BACKBONES, DEFAULT_BACKBONE


class ClassCount(BaseModel):
    name: str
    count: int


class FileIssue(BaseModel):
    path: str
    reason: str


class DatasetPublic(BaseModel):
    id: str
    name: str
    created_at: datetime
    size_bytes: int
    sha256: str
    num_images: int
    num_classes: int
    classes: list[ClassCount]
    rejected: list[FileIssue] = []
    skipped: list[FileIssue] = []


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class Augmentation(BaseModel):
    """Training-time augmentation. Flips are on by default; turn them off for digits or text."""

    model_config = ConfigDict(extra="forbid")

    random_resized_crop: bool = True
    crop_scale_min: float = Field(0.35, gt=0.0, le=1.0)
    hflip: bool = True


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=40)
    backbone: str = DEFAULT_BACKBONE
    epochs: int = Field(5, ge=1, le=500)
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.05, ge=0.0, le=1.0)
    image_size: int = Field(224, ge=32, le=1024)
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    augmentation: Augmentation = Field(default_factory=Augmentation)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone {v!r}; available: {', '.join(sorted(BACKBONES))}")
        return v


class Progress(BaseModel):
    phase: str | None
    epoch: int
    total_epochs: int
    step: int
    total_steps: int
    fraction: float
    eta_seconds: float | None
    updated_at: datetime | None


class JobError(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: str
    dataset_id: str
    status: str
    config: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    heartbeat_age_seconds: float | None
    attempts: int
    progress: Progress
    latest_metrics: dict[str, Any] | None
    best_metrics: dict[str, Any] | None
    error: JobError | None
    model_available: bool


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class MetricPublic(BaseModel):
    epoch: int
    train_loss: float
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    learning_rate: float | None
    images_per_second: float | None
    epoch_seconds: float | None
    created_at: datetime


class MetricsPublic(BaseModel):
    data: list[MetricPublic]
    count: int


class BackbonePublic(BaseModel):
    name: str
    library: str
    params_millions: float
    default_input_size: int
    imagenet_top1: float
    offline_weights: bool


class BackbonesPublic(BaseModel):
    data: list[BackbonePublic]
    count: int

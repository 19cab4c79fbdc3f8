"""Request and response bodies: `XCreate` in, `XPublic` out, `XsPublic(data, count)` lists."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from service.augmentations import AUG_OPS
from service.backbones import BACKBONES, DEFAULT_BACKBONE

NO_NUL = r"^[^\x00]*$"  # free text: anything but NUL, which PostgreSQL text cannot hold


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
    sha256: str = Field(description="content hash: images, labels and splits")
    format: str
    layout: str = Field(description="imagefolder, splits (train/val/test folders) or manifest")
    num_images: int
    num_classes: int
    classes: list[ClassCount]
    splits: dict[str, dict[str, int]] = Field(description="split -> class -> count")
    imbalance_ratio: float | None
    image_sizes: dict[str, Any] | None
    duplicates: dict[str, Any] | None
    leakage: dict[str, Any] | None
    conflicting_labels: dict[str, Any] | None
    rejected: list[FileIssue] = []
    skipped: list[FileIssue] = []
    num_rejected: int = 0
    num_skipped: int = 0


class DatasetImport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=6,
        max_length=1000,
        pattern=NO_NUL,
        description="s3://bucket/prefix holding the dataset's layout",
    )
    name: str | None = Field(None, max_length=200, pattern=NO_NUL)


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


def _ops_json_schema(schema: dict[str, Any]) -> None:
    """The exact shape of each op (its name, its parameters and their ranges) in OpenAPI."""
    schema.clear()
    schema["oneOf"] = [
        {
            "type": "object",
            "title": name,
            "properties": {
                "name": {"const": name},
                **{
                    k: {"type": "number", "minimum": lo, "maximum": hi} for k, (lo, hi) in p.items()
                },
            },
            "required": ["name"],
            "additionalProperties": False,
        }
        for name, p in sorted(AUG_OPS.items())
    ]


class AugmentationOp(BaseModel):
    """One explicit op: `{"name": "rotation", "degrees": 10}`. See AUG_OPS for names and ranges."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_ops_json_schema)

    name: str

    @model_validator(mode="after")
    def _known_op(self) -> AugmentationOp:
        if self.name not in AUG_OPS:
            raise ValueError(
                f"unknown augmentation op {self.name!r}; available: {', '.join(sorted(AUG_OPS))}"
            )
        allowed = AUG_OPS[self.name]
        for key, value in (self.model_extra or {}).items():
            if key not in allowed:
                raise ValueError(
                    f"op {self.name!r} has no parameter {key!r}; "
                    f"it takes: {', '.join(sorted(allowed)) or 'none'}"
                )
            lo, hi = allowed[key]
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not lo <= value <= hi
            ):
                raise ValueError(f"op {self.name!r}: {key}={value!r} is outside [{lo}, {hi}]")
        return self


class Augmentation(BaseModel):
    """Training-time augmentation: a preset, or an explicit list of ops.

    Presets: `none` (center crop), `light` (random resized crop + flip), `standard` (+
    TrivialAugmentWide + random erasing), `strong` (+ MixUp/CutMix). Flips are on by
    default; turn them off for digits, text and anything not mirror-symmetric."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["none", "light", "standard", "strong"] = "light"
    hflip: bool = True
    ops: list[AugmentationOp] | None = Field(None, max_length=20)
    mixup_alpha: float | None = Field(None, ge=0.0, le=10.0)
    cutmix_alpha: float | None = Field(None, ge=0.0, le=10.0)


class EarlyStoppingCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: Literal["val_accuracy", "val_loss", "val_macro_f1"] = "val_accuracy"
    patience: int = Field(3, ge=1, le=100)
    min_delta: float = Field(0.0, ge=0.0, le=1.0)


_BACKBONE_NAMES: list[JsonValue] = list(sorted(BACKBONES))


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    backbone: str = Field(
        DEFAULT_BACKBONE, json_schema_extra={"enum": _BACKBONE_NAMES}
    )  # a plain str with an enum in the schema: the error below lists what is available
    strategy: Literal["lp_ft", "full", "linear_probe", "gradual"] = "lp_ft"
    epochs: int = Field(5, ge=1, le=500)
    probe_epochs: int = Field(30, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    backbone_lr_mult: float | None = Field(None, ge=0.0, le=10.0)
    freeze_norm_stats: bool | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "onecycle", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.5, ge=0.0, le=50.0)
    weight_decay: float | None = Field(
        None, ge=0.0, le=1.0, description="default: 0.05 with AdamW, 1e-4 with SGD"
    )
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5)
    grad_clip_norm: float | None = Field(None, gt=0.0, le=1000.0)
    image_size: int = Field(224, ge=32, le=1024)
    val_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    early_stopping: EarlyStoppingCreate | None = None
    class_balance: Literal["auto", "none", "weighted_loss", "balanced_sampler"] = "auto"
    imbalance_threshold: float = Field(3.0, ge=1.0, le=1000.0)
    time_budget_seconds: float | None = Field(None, ge=5.0, le=7 * 24 * 3600.0)
    max_duration_seconds: float | None = Field(
        None,
        ge=5.0,
        description="hard cap on the job's running time, all attempts together (default and "
        "maximum: the service's JOB_MAX_DURATION_SECONDS). At the limit the job stops, keeps "
        "its best model so far and ends failed with TIME_LIMIT_EXCEEDED",
    )
    compile: bool = False
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
    cancel_requested: bool
    checkpoint_available: bool
    progress: Progress
    latest_metrics: dict[str, Any] | None
    best_metrics: dict[str, Any] | None
    error: JobError | None
    model_available: bool


class JobCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["discard", "stop-and-keep"] = Field(
        "discard",
        description="stop-and-keep: a running job delivers the best model so far as its model",
    )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class MetricPublic(BaseModel):
    epoch: int
    phase: str | None
    val_top5_accuracy: float | None
    val_macro_f1: float | None
    loader_images_per_second: float | None
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
    architecture: str
    params_millions: float
    default_input_size: int
    imagenet_top1: float
    mean: list[float]
    std: list[float]
    interpolation: str
    crop_pct: float
    weights_available: bool
    weights_source: str | None


class BackbonesPublic(BaseModel):
    data: list[BackbonePublic]
    count: int


class JobReport(BaseModel):
    job_id: str
    status: str
    backbone: str
    classes: list[str]
    best_epoch: dict[str, Any] | None
    validation: dict[str, Any] | None
    test: dict[str, Any] | None
    training: dict[str, Any]


# --- tenants, keys, audit ---------------------------------------------------------------


class TenantLimitsUpdate(BaseModel):
    """A tenant's own limits; a field left out (or null) takes the service's default."""

    model_config = ConfigDict(extra="forbid")

    max_running_jobs: int | None = Field(None, ge=1, le=10_000)
    max_queued_jobs: int | None = Field(None, ge=1, le=1_000_000)
    max_storage_bytes: int | None = Field(None, ge=0, le=10**15)
    max_job_duration_seconds: float | None = Field(None, ge=5.0, le=365 * 24 * 3600.0)
    rate_limit_per_minute: int | None = Field(None, ge=1, le=1_000_000)


class TenantCreate(TenantLimitsUpdate):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9_.-]*$")


class TenantLimits(BaseModel):
    max_running_jobs: int
    max_queued_jobs: int
    max_storage_bytes: int
    max_job_duration_seconds: float
    rate_limit_per_minute: int


class TenantUsage(BaseModel):
    running_jobs: int
    queued_jobs: int
    storage_bytes: int


class TenantPublic(BaseModel):
    id: str
    name: str
    created_at: datetime
    disabled_at: datetime | None
    limits: TenantLimits  # in force: the tenant's own values, else the service's
    usage: TenantUsage


class TenantsPublic(BaseModel):
    data: list[TenantPublic]
    count: int


Scope = Literal["read", "write", "admin"]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(
        min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$", description="tenant id or name"
    )
    scopes: list[Scope] = Field(default=["read", "write"], min_length=1)
    name: str = Field("", max_length=200, pattern=NO_NUL)


class KeyPublic(BaseModel):
    id: str
    tenant_id: str
    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="the bearer token; shown this once, stored only hashed")


class KeysPublic(BaseModel):
    data: list[KeyPublic]
    count: int


class AuditEventPublic(BaseModel):
    id: int
    at: datetime
    tenant_id: str | None
    key_id: str | None
    action: str
    object_type: str
    object_id: str | None
    client: str | None
    detail: dict[str, Any]


class AuditEventsPublic(BaseModel):
    data: list[AuditEventPublic]
    count: int


class MePublic(BaseModel):
    tenant_id: str
    tenant_name: str
    key_id: str | None
    scopes: list[str]
    auth_enabled: bool
    limits: TenantLimits
    usage: TenantUsage

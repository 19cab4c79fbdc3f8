"""Request and response bodies: `XCreate` in, `XPublic` out, `XsPublic(data, count)` lists,
and `x_public(row)`, the one place a row becomes its wire view.

The job's request body (`JobCreate`) is the job spec in `core/jobspec.py`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row

from core.db import as_utc, utcnow
from core.jobs import model_ready
from core.jobspec import Augmentation, AugmentationOp, EarlyStopping, JobCreate
from core.models import Dataset, Job, JobStatus
from service.ingest.model import MAX_LISTED

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
    task: Literal["single-label", "multi-label"] = Field(
        "single-label", description="multi-label: several classes per image (a labels column)"
    )
    num_images: int
    num_classes: int
    classes: list[ClassCount]
    splits: dict[str, dict[str, int]] = Field(description="split -> class -> count")
    imbalance_ratio: float | None
    label_cardinality: float | None = Field(None, description="mean classes per image")
    image_sizes: dict[str, Any] | None
    duplicates: dict[str, Any] | None
    leakage: dict[str, Any] | None
    conflicting_labels: dict[str, Any] | None
    rejected: list[FileIssue] = []
    skipped: list[FileIssue] = []
    num_rejected: int = 0
    num_skipped: int = 0


def dataset_public(ds: Dataset) -> DatasetPublic:
    report = ds.report or {}
    details = report.get("details", {})
    return DatasetPublic(
        id=ds.id,
        name=ds.name,
        created_at=ds.created_at,
        size_bytes=ds.size_bytes,
        sha256=ds.sha256,
        format=report.get("format", "zip"),
        layout=report.get("layout", "imagefolder"),
        task=report.get("task", "single-label"),
        num_images=ds.num_images,
        num_classes=len(ds.classes),
        classes=[ClassCount(name=c, count=int(ds.class_counts.get(c, 0))) for c in ds.classes],
        splits=details.get("counts", {}),
        imbalance_ratio=details.get("imbalance_ratio"),
        label_cardinality=details.get("label_cardinality"),
        image_sizes=details.get("image_sizes"),
        duplicates=details.get("duplicates"),
        leakage=details.get("leakage"),
        conflicting_labels=details.get("conflicting_labels"),
        rejected=[FileIssue(**r) for r in report.get("rejected", [])[:MAX_LISTED]],
        skipped=[FileIssue(**r) for r in report.get("skipped", [])[:MAX_LISTED]],
        num_rejected=report.get("num_rejected", len(report.get("rejected", []))),
        num_skipped=report.get("num_skipped", len(report.get("skipped", []))),
    )


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


__all__ = ["Augmentation", "AugmentationOp", "EarlyStopping", "JobCreate"]


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
    warnings: list[str] = Field(
        default_factory=list,
        description="what to know about the delivered model, e.g. that the time budget cut "
        "training short",
    )


_SUCCEEDED = JobStatus.SUCCEEDED.value


def job_public_data(job: Job | Row[Any]) -> dict[str, Any]:
    """`JobPublic`'s fields as plain data, from a `Job` or a Core row of its columns
    (core/job_reads.py): the one place they are computed. The job poll and list fast paths
    serialise this directly (`pydantic_core.to_json`, no model built per job: a 20-job page
    spent 30% of its time building them); `job_public` validates it into the model, and
    tests/unit/test_job_public_json.py holds the two byte-for-byte equal."""
    total = job.total_steps or 0
    fraction = 1.0 if job.status == _SUCCEEDED else (min(1.0, job.step / total) if total else 0.0)
    heartbeat = as_utc(job.heartbeat_at)
    eta = job.eta_seconds
    return {
        "id": job.id,
        "dataset_id": job.dataset_id,
        "status": job.status,
        "config": job.config,
        "created_at": as_utc(job.created_at),
        "started_at": as_utc(job.started_at),
        "finished_at": as_utc(job.finished_at),
        "heartbeat_at": heartbeat,
        "heartbeat_age_seconds": (utcnow() - heartbeat).total_seconds() if heartbeat else None,
        "attempts": int(job.attempts),
        "cancel_requested": bool(job.cancel_requested),
        "checkpoint_available": job.checkpoint_key is not None,
        "progress": {
            "phase": job.phase,
            "epoch": int(job.epoch),
            "total_epochs": int(job.total_epochs or job.config.get("epochs", 0)),
            "step": int(job.step),
            "total_steps": int(total),
            "fraction": float(round(fraction, 4)),
            "eta_seconds": None if eta is None else float(eta),
            "updated_at": as_utc(job.progress_at),
        },
        "latest_metrics": job.latest_metrics,
        "best_metrics": job.best_metrics,
        "error": (
            {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
        ),
        "model_available": model_ready(job),
        "warnings": [str(w) for w in (job.result or {}).get("warnings") or []],
    }


def job_public(job: Job | Row[Any]) -> JobPublic:
    """From a `Job` or a Core row of its columns (core/job_reads.py)."""
    return JobPublic.model_validate(job_public_data(job))


class JobCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["discard", "stop-and-keep"] = Field(
        "discard",
        description="stop-and-keep: a running job delivers the best model so far as its model",
    )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(
        description="the jobs that match the filters; a count of 1,000 or more may be up "
        "to 2 s old (README, Production)"
    )
    next_cursor: str | None = Field(
        None, description="pass as `after` for the next page; null on the last page"
    )


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
    warnings: list[str] = Field(default_factory=list)


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


Scope = Literal["read", "write", "admin", "operator"]


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

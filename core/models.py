"""Database tables. The job row is the truth about a job; Celery keeps no state."""

from __future__ import annotations

import enum
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.db import utcnow


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    INTERRUPTED = "interrupted"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


# Rows created before tenants existed, and everything when AUTH_ENABLED=false, belong here.
DEFAULT_TENANT = "default"


class Tenant(Base):
    """Owns datasets, jobs and models. Limits left empty take the service's defaults."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    max_job_duration_seconds: Mapped[float | None] = mapped_column(Float)
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    # Disabled: its keys are revoked, no new ones; its objects and running jobs are kept.
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """A bearer token `ft_<id>_<secret>`; only the SHA-256 of the whole token is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # public, in the token
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who did what to which object: keys, tenants, datasets, jobs, downloads."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    tenant_id: Mapped[str | None] = mapped_column(String(40), index=True)
    key_id: Mapped[str | None] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(60))
    object_type: Mapped[str] = mapped_column(String(20))
    object_id: Mapped[str | None] = mapped_column(String(60))
    client: Mapped[str | None] = mapped_column(String(100))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id"), index=True, default=DEFAULT_TENANT
    )
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    archive_key: Mapped[str] = mapped_column(String(500))
    index_key: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # the upload (an import: its archive)
    # What the store holds for it (canonical archive, index, thumbnails): the quota charges this.
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    sha256: Mapped[str] = mapped_column(String(64))
    num_images: Mapped[int] = mapped_column(Integer)
    classes: Mapped[list[Any]] = mapped_column(JSON)  # class names, index = label
    class_counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # layout, files, duplicates
    # Datasets are immutable; deleting one removes its files and hides it, while the jobs
    # that used it keep their record (and the content hash).
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    __tablename__ = "jobs"
    # The reaper looks for ended jobs still pointing at checkpoints every round, in every
    # process: index only the few rows that have one.
    __table_args__ = (
        Index(
            "ix_jobs_with_checkpoint",
            "status",
            postgresql_where=text("checkpoint_key IS NOT NULL"),
            sqlite_where=text("checkpoint_key IS NOT NULL"),
        ),
        # `GET /v1/jobs`: a tenant's jobs newest first, alone or by status or dataset (0014).
        Index("ix_jobs_tenant_created", "tenant_id", text("created_at DESC"), "id"),
        Index(
            "ix_jobs_tenant_status_created", "tenant_id", "status", text("created_at DESC"), "id"
        ),
        Index(
            "ix_jobs_tenant_dataset_created",
            "tenant_id",
            "dataset_id",
            text("created_at DESC"),
            "id",
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id"), index=True, default=DEFAULT_TENANT
    )
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True, default=JobStatus.QUEUED.value)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # Who runs it and whether it is alive.
    worker_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Running time of earlier attempts (a resumed job's time limit counts all of them).
    run_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # When the reaper last sent a long-queued job's task again (its message may be lost).
    resent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    cancel_mode: Mapped[str | None] = mapped_column(String(20))  # "discard" or "stop-and-keep"

    # Progress, written by the worker while it trains.
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    total_epochs: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str | None] = mapped_column(String(40))
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    best_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # model keys, final report
    error_code: Mapped[str | None] = mapped_column(String(60))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)
    checkpoint_key: Mapped[str | None] = mapped_column(String(500))  # last epoch's checkpoint


class JobMetric(Base):
    """One row per finished epoch."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "epoch", name="uq_job_metrics_job_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    train_loss: Mapped[float] = mapped_column(Float)
    train_accuracy: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    images_per_second: Mapped[float | None] = mapped_column(Float)
    epoch_seconds: Mapped[float | None] = mapped_column(Float)
    phase: Mapped[str | None] = mapped_column(String(20))  # "probe" or "fine_tune"
    val_top5_accuracy: Mapped[float | None] = mapped_column(Float)
    val_macro_f1: Mapped[float | None] = mapped_column(Float)
    loader_images_per_second: Mapped[float | None] = mapped_column(Float)


class ModelStage(str, enum.Enum):
    """Where a registered model stands. One `production` model per name at most: promoting
    one archives the one before (core/registry.py)."""

    NONE = "none"
    STAGING = "staging"
    PRODUCTION = "production"
    ARCHIVED = "archived"


class RegisteredModel(Base):
    """The model of a succeeded job, in the registry: `name` version `version` of its tenant,
    created with the job's success in the same transaction (core/registry.py)."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version", name="uq_models_tenant_name_version"),
        # What `name@production` resolves to is one row, whatever two promotions race.
        Index(
            "uq_models_one_production",
            "tenant_id",
            "name",
            unique=True,
            postgresql_where=text("stage = 'production'"),
            sqlite_where=text("stage = 'production'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    stage: Mapped[str] = mapped_column(String(20), default=ModelStage.NONE.value)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookEndpoint(Base):
    """Where a tenant's job events are posted (core/webhooks.py). `job_id` set: the one
    job's `webhook_url`. The secret is stored as-is: the service must sign with it."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(100))
    events: Mapped[list[Any]] = mapped_column(JSON)
    description: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One event for one endpoint: `pending` (due at `next_attempt_at`), then `succeeded`
    or `failed` once its tries are spent. `attempt_log`: every try's status code or error."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    event: Mapped[str] = mapped_column(String(40))
    event_id: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    attempt_log: Mapped[list[Any]] = mapped_column(JSON, default=list)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Worker(Base):
    """A training or light worker and what it can run, as it last said (`core/fleet.py`):
    the submit check and the queue a job goes to ask the live ones, not the API's host."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery's node name
    hostname: Mapped[str] = mapped_column(String(255))
    queues: Mapped[list[Any]] = mapped_column(JSON)
    device_kind: Mapped[str] = mapped_column(String(10))  # "cpu" or "cuda"
    device_name: Mapped[str] = mapped_column(String(200))
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    backbones: Mapped[list[Any]] = mapped_column(JSON)  # those with weights it can load
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

"""Jobs as the API sees them: submit (every rule a job must pass before it is queued),
cancel, and what a job has delivered (its model files, report and plots).

Submitting commits the row first, then sends the task by name: the worker re-reads the row,
and a job the broker never received is recorded as failed, not left queued forever. The row
is committed under its dataset's row lock, which deleting the dataset takes too: a job is
never queued on a dataset that is gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import fleet, queue, transitions, webhook_store
from core.datasets import get_owned_dataset, locked
from core.errors import ErrorCode, ServiceError
from core.jobspec import JobCreate, pinned_fields
from core.models import Dataset, Job, JobMetric, JobStatus, new_id
from core.settings import Settings
from core.storage import ObjectStore
from core.tenancy import ACTIVE, Limits, Principal, audit, count_jobs

log = logging.getLogger(__name__)

# What a job's model can be downloaded as: name -> (key in job.result, media type, suffix)
MODEL_FORMATS: dict[str, tuple[str, str, str]] = {
    "zip": ("bundle_key", "application/zip", "model.zip"),
    "safetensors": ("safetensors_key", "application/octet-stream", "model.safetensors"),
    "torchscript": ("torchscript_key", "application/octet-stream", "model.torchscript.pt"),
    "metadata": ("metadata_key", "application/json", "metadata.json"),
    "onnx": ("onnx_key", "application/octet-stream", "model.onnx"),
    "onnx_int8": ("onnx_int8_key", "application/octet-stream", "model.int8.onnx"),
    "card": ("card_key", "text/markdown; charset=utf-8", "README.md"),
}
PLOTS = ("curves", "confusion_matrix", "label_issues", "top_losses")


def get_owned_job(session: Session, principal: Principal, job_id: str) -> Job:
    """The caller's job; another tenant's answers exactly like a missing one."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != principal.tenant_id:
        raise ServiceError(ErrorCode.JOB_NOT_FOUND, f"job {job_id!r} not found")
    return job


def model_ready(job: Job | Any) -> bool:
    """Succeeded; canceled with stop-and-keep, or stopped at its time limit, after at least
    one epoch (the best epoch so far is the model)."""
    return job.status in _ENDED and bool(job.result and job.result.get("bundle_key"))


_ENDED = frozenset(s.value for s in (JobStatus.SUCCEEDED, JobStatus.CANCELED, JobStatus.FAILED))


def submit_job(
    session: Session,
    principal: Principal,
    limits: Limits,
    spec: JobCreate,
    settings: Settings,
    client: str | None = None,
) -> Job:
    """Check the job against the tenant's limits, the host's weights and its dataset, commit
    it as queued, then send it to the broker. Raises ServiceError for each refusal."""
    try:
        ds = get_owned_dataset(session, principal, spec.dataset_id)
    except ServiceError as exc:
        exc.detail += "; upload one with POST /v1/datasets"
        raise
    waiting = count_jobs(session, principal.tenant_id, ACTIVE)
    if waiting >= limits.max_queued_jobs:
        raise ServiceError(
            ErrorCode.QUEUED_JOBS_LIMIT,
            f"your tenant has {waiting} jobs waiting to run, its limit (max_queued_jobs) is "
            f"{limits.max_queued_jobs}; submit again when some have started, or cancel some",
            headers={"Retry-After": "30"},
        )
    # The live workers' say: a GPU, `gpus` of them, the backbone's weights.
    fleet.check_submit(session, settings, spec.backbone, spec.device, spec.gpus)
    val_min = min(ds.class_counts.values())
    if val_min * spec.val_fraction < 1 and val_min < 2:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            "every class needs at least 2 images to hold one out for validation",
        )
    limit = limits.max_job_duration_seconds
    if spec.max_duration_seconds is not None and spec.max_duration_seconds > limit:
        raise ServiceError(
            ErrorCode.JOB_DURATION_LIMIT,
            f"max_duration_seconds {spec.max_duration_seconds:g} is over your tenant's limit "
            f"of {limit:g}s (max_job_duration_seconds, at most the service's "
            f"JOB_MAX_DURATION_SECONDS); ask for {limit:g} or less",
        )
    config = spec.model_dump(mode="json")
    config["dataset_sha256"] = ds.sha256
    config["pinned"] = pinned_fields(spec)
    config["max_duration_seconds"] = spec.max_duration_seconds or limit
    job = Job(
        id=new_id("job"),
        tenant_id=principal.tenant_id,
        dataset_id=ds.id,
        status=JobStatus.QUEUED.value,
        config=config,
        total_epochs=spec.epochs,
    )
    hook = webhook_store.job_endpoint(job, spec.webhook_url, settings)  # refused before commit
    with locked(session, Dataset, ds.id) as current:
        if current.deleted_at is not None:  # deleted since it was read above
            raise ServiceError(
                ErrorCode.DATASET_NOT_FOUND,
                f"dataset {spec.dataset_id!r} not found; upload one with POST /v1/datasets",
            )
        session.add(job)
        session.add_all([hook] if hook else [])
        audit(
            session,
            principal,
            "job.create",
            "job",
            job.id,
            client,
            {"dataset_id": ds.id, "backbone": spec.backbone},
        )
        session.commit()
    _send(session, job.id, settings)
    session.refresh(job)
    return job


def _send(session: Session, job_id: str, settings: Settings) -> None:
    """Send the committed job; if the broker is unreachable, record it as failed."""
    try:
        queue.send_train(job_id, settings)
    except Exception as exc:
        log.exception("could not enqueue job %s", job_id)
        transitions.fail(
            session,
            job_id,
            code=ErrorCode.BROKER_UNAVAILABLE.value,
            message=f"the job could not be queued: {exc}",
        )
        webhook_store.notify(session, job_id, settings)
        raise ServiceError(
            ErrorCode.BROKER_UNAVAILABLE,
            f"the job queue is unreachable; job {job_id} was recorded as failed, submit again",
        ) from exc


def cancel_job(
    session: Session,
    principal: Principal,
    job_id: str,
    mode: str,
    client: str | None = None,
    settings: Settings | None = None,
) -> Job:
    """A queued job is canceled at once; a running one stops at its next step (`mode`:
    discard, or stop-and-keep). JOB_FINISHED if it has already ended."""
    get_owned_job(session, principal, job_id)
    if transitions.request_cancel(session, job_id, mode) is None:
        job = get_owned_job(session, principal, job_id)
        raise ServiceError(ErrorCode.JOB_FINISHED, f"job {job_id} has already ended ({job.status})")
    audit(session, principal, "job.cancel", "job", job_id, client, {"mode": mode})
    session.commit()
    webhook_store.notify(session, job_id, settings)  # job.canceled, if it was queued
    session.expire_all()
    return get_owned_job(session, principal, job_id)


def job_metrics(session: Session, principal: Principal, job_id: str) -> list[JobMetric]:
    """The caller's job's metrics, one row per epoch."""
    get_owned_job(session, principal, job_id)
    return list(
        session.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)
        ).all()
    )


@dataclass(frozen=True)
class ModelFile:
    key: str
    media_type: str
    disposition: str  # Content-Disposition, with the download's file name
    url: str | None  # a presigned GET URL when the store issues them (S3)


def open_model(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    principal: Principal,
    job_id: str,
    fmt: str,
    client: str | None = None,
) -> ModelFile:
    """The trained model file in format `fmt` (a MODEL_FORMATS name), its download audited.
    The presigned URL is issued only after the ownership check."""
    job = get_owned_job(session, principal, job_id)
    if not model_ready(job) or job.result is None:
        raise ServiceError(
            ErrorCode.MODEL_NOT_AVAILABLE,
            f"job {job_id} is {job.status}; a model is available once it has succeeded "
            "(or was canceled with stop-and-keep, or stopped at its time limit after an epoch)",
        )
    result_key, media_type, filename = MODEL_FORMATS[fmt]
    key = job.result.get(result_key)
    if not key:
        raise ServiceError(ErrorCode.MODEL_NOT_AVAILABLE, missing_format(job, fmt))
    disposition = f'attachment; filename="{job_id}-{filename}"'
    url = store.presigned_get(key, settings.download_url_ttl_seconds, disposition, media_type)
    audit(
        session,
        principal,
        "model.download",
        "job",
        job_id,
        client,
        {"format": fmt, "via": "presigned_url" if url else "stream"},
    )
    session.commit()
    return ModelFile(key, media_type, disposition, url)


def missing_format(job: Job | Any, fmt: str) -> str:
    """Why a finished job's model has no file in format `fmt`."""
    said = [w for w in (job.result or {}).get("warnings") or [] if "onnx" in w]
    if fmt == "onnx_int8" and not said:
        return f"job {job.id} was not asked for an int8 model (submit with export_int8: true)"
    why = f": {said[0]}" if said else " (it was trained before this format was exported)"
    have = [name for name, (key, _, _) in MODEL_FORMATS.items() if (job.result or {}).get(key)]
    return f"job {job.id}'s model has no {fmt} file{why}; available: {', '.join(have)}"


def succeeded_job(
    session: Session, principal: Principal, job_id: str
) -> tuple[Job, dict[str, Any]]:
    """The caller's job and its result, once it has succeeded with an evaluation report."""
    job = get_owned_job(session, principal, job_id)
    result = job.result or {}
    if job.status != JobStatus.SUCCEEDED.value or "report" not in result:
        raise ServiceError(
            ErrorCode.REPORT_NOT_AVAILABLE,
            f"job {job_id} is {job.status}; the evaluation report is written when it succeeds "
            f"(live metrics: GET /v1/jobs/{job_id}/metrics)",
        )
    return job, result


def plot_key(
    session: Session, store: ObjectStore, principal: Principal, job_id: str, name: str
) -> str:
    """Where the caller's job's plot `name` (one of PLOTS) is stored, once it is drawn."""
    get_owned_job(session, principal, job_id)
    if name not in PLOTS:
        raise ServiceError(
            ErrorCode.NOT_FOUND, f"no plot named {name!r}; available: {', '.join(PLOTS)}"
        )
    key = f"jobs/{job_id}/plots/{name}.png"
    if not store.exists(key):
        raise ServiceError(
            ErrorCode.PLOT_NOT_AVAILABLE,
            f"plot {name!r} of job {job_id} is not drawn yet (curves after the first epoch, "
            "the confusion matrix, label issues and top losses when the job succeeds)",
        )
    return key

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy import select

from core import queue, transitions
from core.backbones import BACKBONES
from core.db import as_utc, utcnow
from core.models import Job, JobMetric, JobStatus, new_id
from core.tenancy import ACTIVE, Principal, audit, count_jobs
from service.deps import (
    LimitsDep,
    Offset,
    PathId,
    QueryId,
    ReadDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    WriteDep,
    client_of,
    page,
)
from service.errors import ERROR_RESPONSES, ErrorCode, ServiceError
from service.routes.backbones import usable_backbones, weights_on_host
from service.routes.datasets import get_owned_dataset
from service.schemas import (
    JobCancel,
    JobCreate,
    JobError,
    JobPublic,
    JobReport,
    JobsPublic,
    MetricPublic,
    MetricsPublic,
    Progress,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

# What GET /v1/jobs/{id}/model can return: name -> (key in job.result, media type, suffix)
MODEL_FORMATS: dict[str, tuple[str, str, str]] = {
    "zip": ("bundle_key", "application/zip", "model.zip"),
    "safetensors": ("safetensors_key", "application/octet-stream", "model.safetensors"),
    "torchscript": ("torchscript_key", "application/octet-stream", "model.torchscript.pt"),
    "metadata": ("metadata_key", "application/json", "metadata.json"),
}


def job_public(job: Job) -> JobPublic:
    total = job.total_steps or 0
    fraction = (
        1.0
        if job.status == JobStatus.SUCCEEDED.value
        else (min(1.0, job.step / total) if total else 0.0)
    )
    heartbeat = as_utc(job.heartbeat_at)
    error = (
        JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    )
    return JobPublic(
        id=job.id,
        dataset_id=job.dataset_id,
        status=job.status,
        config=job.config,
        created_at=as_utc(job.created_at),  # type: ignore[arg-type]
        started_at=as_utc(job.started_at),
        finished_at=as_utc(job.finished_at),
        heartbeat_at=heartbeat,
        heartbeat_age_seconds=(utcnow() - heartbeat).total_seconds() if heartbeat else None,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        checkpoint_available=job.checkpoint_key is not None,
        progress=Progress(
            phase=job.phase,
            epoch=job.epoch,
            total_epochs=job.total_epochs or job.config.get("epochs", 0),
            step=job.step,
            total_steps=total,
            fraction=round(fraction, 4),
            eta_seconds=job.eta_seconds,
            updated_at=as_utc(job.progress_at),
        ),
        latest_metrics=job.latest_metrics,
        best_metrics=job.best_metrics,
        error=error,
        model_available=_model_ready(job),
    )


def _model_ready(job: Job) -> bool:
    """Succeeded; canceled with stop-and-keep, or stopped at its time limit, after at least
    one epoch (the best epoch so far is the model)."""
    ended = job.status in (
        JobStatus.SUCCEEDED.value,
        JobStatus.CANCELED.value,
        JobStatus.FAILED.value,
    )
    return ended and bool(job.result and job.result.get("bundle_key"))


def _get_job(session: SessionDep, principal: Principal, job_id: str) -> Job:
    """The caller's job; another tenant's answers exactly like a missing one."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != principal.tenant_id:
        raise ServiceError(ErrorCode.JOB_NOT_FOUND, f"job {job_id!r} not found")
    return job


@router.post("", status_code=201, response_model=JobPublic)
def create_job(
    request: Request,
    body: JobCreate,
    principal: WriteDep,
    limits: LimitsDep,
    session: SessionDep,
    settings: SettingsDep,
) -> JobPublic:
    """Queue a fine-tuning job. The row is committed first, then the task is sent by name."""
    try:
        ds = get_owned_dataset(session, principal, body.dataset_id)
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
    spec = BACKBONES[body.backbone]
    if not settings.allow_weight_downloads and weights_on_host(spec, settings) is None:
        raise ServiceError(
            ErrorCode.WEIGHTS_UNAVAILABLE,
            f"no ImageNet weights for {body.backbone!r} on this host; usable now: "
            f"{', '.join(usable_backbones(settings))}. Run `finetune weights pull "
            f"{body.backbone}` on a host with internet, or set ALLOW_WEIGHT_DOWNLOADS=true",
        )
    val_min = min(ds.class_counts.values())
    if val_min * body.val_fraction < 1 and val_min < 2:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            "every class needs at least 2 images to hold one out for validation",
        )
    limit = limits.max_job_duration_seconds
    if body.max_duration_seconds is not None and body.max_duration_seconds > limit:
        raise ServiceError(
            ErrorCode.JOB_DURATION_LIMIT,
            f"max_duration_seconds {body.max_duration_seconds:g} is over your tenant's limit "
            f"of {limit:g}s (max_job_duration_seconds, at most the service's "
            f"JOB_MAX_DURATION_SECONDS); ask for {limit:g} or less",
        )
    config = body.model_dump(mode="json")
    config["dataset_sha256"] = ds.sha256
    config["max_duration_seconds"] = body.max_duration_seconds or limit
    job = Job(
        id=new_id("job"),
        tenant_id=principal.tenant_id,
        dataset_id=ds.id,
        status=JobStatus.QUEUED.value,
        config=config,
        total_epochs=body.epochs,
    )
    session.add(job)
    audit(
        session,
        principal,
        "job.create",
        "job",
        job.id,
        client_of(request),
        {"dataset_id": ds.id, "backbone": body.backbone},
    )
    session.commit()
    try:
        queue.send_train(job.id, settings)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        transitions.fail(
            session,
            job.id,
            code=ErrorCode.BROKER_UNAVAILABLE.value,
            message=f"the job could not be queued: {exc}",
        )
        raise ServiceError(
            ErrorCode.BROKER_UNAVAILABLE,
            f"the job queue is unreachable; job {job.id} was recorded as failed, submit again",
        ) from exc
    session.refresh(job)
    return job_public(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    principal: ReadDep,
    session: SessionDep,
    status: Annotated[JobStatus | None, Query()] = None,
    dataset_id: QueryId = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> JobsPublic:
    where = [Job.tenant_id == principal.tenant_id]
    if status is not None:
        where.append(Job.status == status.value)
    if dataset_id is not None:
        where.append(Job.dataset_id == dataset_id)
    rows, count = page(session, Job, where, (Job.created_at.desc(), Job.id), limit, offset)
    return JobsPublic(data=[job_public(j) for j in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: PathId, principal: ReadDep, session: SessionDep) -> JobPublic:
    return job_public(_get_job(session, principal, job_id))


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def read_job_metrics(job_id: PathId, principal: ReadDep, session: SessionDep) -> MetricsPublic:
    _get_job(session, principal, job_id)
    rows = session.scalars(
        select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.epoch)
    ).all()
    data = [MetricPublic.model_validate(r, from_attributes=True) for r in rows]
    return MetricsPublic(data=data, count=len(data))


@router.get(
    "/{job_id}/model",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/zip": {}, "application/octet-stream": {}}},
        307: {"description": "S3 storage: a short-lived presigned GET URL in `Location`"},
    },
)
def download_model(
    request: Request,
    job_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    format: Literal["zip", "safetensors", "torchscript", "metadata"] = "zip",  # noqa: A002
) -> Response:
    """The trained model. `zip` bundles safetensors weights, metadata.json and TorchScript.
    With S3 storage the answer is a 307 to a presigned URL valid DOWNLOAD_URL_TTL_SECONDS,
    issued only after the ownership check; with local storage the API streams the file."""
    job = _get_job(session, principal, job_id)
    if not _model_ready(job) or job.result is None:
        raise ServiceError(
            ErrorCode.MODEL_NOT_AVAILABLE,
            f"job {job_id} is {job.status}; a model is available once it has succeeded "
            "(or was canceled with stop-and-keep, or stopped at its time limit after an epoch)",
        )
    result_key, media_type, filename = MODEL_FORMATS[format]
    key = job.result[result_key]
    disposition = f'attachment; filename="{job_id}-{filename}"'
    url = store.presigned_get(key, settings.download_url_ttl_seconds, disposition, media_type)
    audit(
        session,
        principal,
        "model.download",
        "job",
        job_id,
        client_of(request),
        {"format": format, "via": "presigned_url" if url else "stream"},
    )
    session.commit()
    if url is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    return StreamingResponse(
        store.iter_chunks(key),
        media_type=media_type,
        headers={
            "Content-Disposition": disposition,
            "Content-Length": str(store.size(key)),
        },
    )


@router.get("/{job_id}/report", response_model=JobReport)
def read_job_report(job_id: PathId, principal: ReadDep, session: SessionDep) -> JobReport:
    """Full evaluation of the delivered model: top-1/top-5, per-class precision, recall and
    F1, macro-F1, confusion matrix and expected calibration error, on the validation split
    (and the test split when the dataset has one)."""
    job = _get_job(session, principal, job_id)
    result = job.result or {}
    if job.status != JobStatus.SUCCEEDED.value or "report" not in result:
        raise ServiceError(
            ErrorCode.REPORT_NOT_AVAILABLE,
            f"job {job_id} is {job.status}; the evaluation report is written when it succeeds "
            f"(live metrics: GET /v1/jobs/{job_id}/metrics)",
        )
    return JobReport(
        job_id=job.id,
        status=job.status,
        backbone=job.config["backbone"],
        classes=result.get("classes", []),
        best_epoch=job.best_metrics,
        validation=result["report"].get("validation"),
        test=result["report"].get("test"),
        training=result.get("training", {}),
    )


PLOTS = ("curves", "confusion_matrix")


@router.get(
    "/{job_id}/plots/{name}.png",
    response_class=StreamingResponse,
    responses={200: {"content": {"image/png": {}}}},
)
def read_job_plot(
    job_id: PathId, name: str, principal: ReadDep, session: SessionDep, store: StoreDep
) -> StreamingResponse:
    """`curves` (loss and accuracy per epoch, updated live) or `confusion_matrix` (at the end)."""
    _get_job(session, principal, job_id)
    if name not in PLOTS:
        raise ServiceError(
            ErrorCode.NOT_FOUND, f"no plot named {name!r}; available: {', '.join(PLOTS)}"
        )
    key = f"jobs/{job_id}/plots/{name}.png"
    if not store.exists(key):
        raise ServiceError(
            ErrorCode.PLOT_NOT_AVAILABLE,
            f"plot {name!r} of job {job_id} is not drawn yet (curves after the first epoch, "
            "the confusion matrix when the job succeeds)",
        )
    return StreamingResponse(store.iter_chunks(key), media_type="image/png")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(
    request: Request,
    job_id: PathId,
    principal: WriteDep,
    session: SessionDep,
    body: JobCancel | None = None,
) -> JobPublic:
    """A queued job is canceled at once and never starts. A running job stops at its next
    step and releases its worker; `stop-and-keep` makes the best epoch so far its model,
    `discard` (default) keeps nothing. A finished job cannot be canceled (409)."""
    _get_job(session, principal, job_id)
    mode = (body or JobCancel()).mode
    if transitions.request_cancel(session, job_id, mode) is None:
        job = _get_job(session, principal, job_id)
        raise ServiceError(ErrorCode.JOB_FINISHED, f"job {job_id} has already ended ({job.status})")
    audit(session, principal, "job.cancel", "job", job_id, client_of(request), {"mode": mode})
    session.commit()
    session.expire_all()
    return job_public(_get_job(session, principal, job_id))

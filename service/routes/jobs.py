"""Jobs: submit, list, read, cancel, and what a finished job delivers. The rules live in
`core/jobs.py`; these handlers parse, call it, and answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy import Connection

from core import job_reads, jobs, webhook_store
from core.models import JobStatus
from core.storage import ObjectStore
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
    in_read,
)
from service.errors import ERROR_RESPONSES
from service.schemas import (
    JobCancel,
    JobCreate,
    JobPublic,
    JobReport,
    JobsPublic,
    MetricPublic,
    MetricsPublic,
    job_public,
)
from service.webhook_schemas import JobCreated

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

# What `?format=` downloads (core.jobs.MODEL_FORMATS), here and in the model registry.
# The names of core.jobs.MODEL_FORMATS.
ModelFormat = Literal["zip", "safetensors", "onnx", "onnx_int8", "torchscript", "metadata", "card"]
MODEL_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/zip": {}, "application/octet-stream": {}}},
    307: {"description": "S3 storage: a short-lived presigned GET URL in `Location`"},
}


def model_response(store: ObjectStore, model: jobs.ModelFile) -> Response:
    """A 307 to the presigned URL (S3), or the file streamed by the API (local storage)."""
    if model.url is not None:
        return RedirectResponse(model.url, status_code=307, headers={"Cache-Control": "no-store"})
    return StreamingResponse(
        store.iter_chunks(model.key),
        media_type=model.media_type,
        headers={
            "Content-Disposition": model.disposition,
            "Content-Length": str(store.size(model.key)),
        },
    )


@router.post("", status_code=201, response_model=JobCreated)
def create_job(
    request: Request,
    body: JobCreate,
    principal: WriteDep,
    limits: LimitsDep,
    session: SessionDep,
    settings: SettingsDep,
) -> JobCreated:
    """Queue a fine-tuning job. The row is committed first, then the task is sent by name.
    With `webhook_url`, the answer carries its signing secret (`webhook_secret`), once."""
    job = jobs.submit_job(session, principal, limits, body, settings, client_of(request))
    job_reads.forget_counts(principal.tenant_id)
    secret = webhook_store.job_secret(session, job.id) if body.webhook_url else None
    return JobCreated(**job_public(job).model_dump(), webhook_secret=secret)


# The two routes that clients poll are `async def` around one thread hop (`in_read`), and
# read with one Core statement on the autocommit engine (core/job_reads.py).
@router.get("", response_model=JobsPublic)
async def list_jobs(
    principal: ReadDep,
    settings: SettingsDep,
    status: Annotated[JobStatus | None, Query()] = None,
    dataset_id: QueryId = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
    after: Annotated[
        str | None,
        Query(
            pattern=job_reads.CURSOR_PATTERN,
            description="the `next_cursor` of the previous page: the next page by keyset, "
            "as cheap at page 1,000 as at page 1 (`offset` also works)",
        ),
    ] = None,
) -> JobsPublic:
    """The caller's jobs, newest first (served by the (tenant, [status|dataset], newest)
    indexes of migration 0014, deep offsets included). `next_cursor` is set while more
    jobs follow: pass it as `after` for the next page."""

    def work(conn: Connection) -> JobsPublic:
        rows, count, cursor = job_reads.job_page(
            conn,
            principal,
            status=status.value if status is not None else None,
            dataset_id=dataset_id,
            limit=limit,
            offset=offset,
            after=after,
        )
        return JobsPublic(data=[job_public(j) for j in rows], count=count, next_cursor=cursor)

    return await in_read(settings, work)


@router.get("/{job_id}", response_model=JobPublic)
async def read_job(job_id: PathId, principal: ReadDep, settings: SettingsDep) -> JobPublic:
    return await in_read(
        settings,
        lambda conn: job_public(job_reads.owned_job(conn, principal, job_id)),
        bounded=True,
    )


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def read_job_metrics(job_id: PathId, principal: ReadDep, session: SessionDep) -> MetricsPublic:
    rows = jobs.job_metrics(session, principal, job_id)
    data = [MetricPublic.model_validate(r, from_attributes=True) for r in rows]
    return MetricsPublic(data=data, count=len(data))


@router.get("/{job_id}/model", response_class=StreamingResponse, responses=MODEL_DOWNLOAD_RESPONSES)
def download_model(
    request: Request,
    job_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    format: ModelFormat = "zip",  # noqa: A002
) -> Response:
    """The trained model. `zip` bundles safetensors weights, metadata.json and TorchScript.
    With S3 storage the answer is a 307 to a presigned URL valid DOWNLOAD_URL_TTL_SECONDS,
    issued only after the ownership check; with local storage the API streams the file."""
    model = jobs.open_model(session, store, settings, principal, job_id, format, client_of(request))
    return model_response(store, model)


@router.get("/{job_id}/report", response_model=JobReport)
def read_job_report(job_id: PathId, principal: ReadDep, session: SessionDep) -> JobReport:
    """Full evaluation of the delivered model: top-1/top-5, per-class precision, recall and
    F1, macro-F1, confusion matrix and expected calibration error, on the validation split
    (and the test split when the dataset has one)."""
    job, result = jobs.succeeded_job(session, principal, job_id)
    return JobReport(
        job_id=job.id,
        status=job.status,
        backbone=job.config["backbone"],
        classes=result.get("classes", []),
        best_epoch=job.best_metrics,
        validation=result["report"].get("validation"),
        test=result["report"].get("test"),
        training=result.get("training", {}),
        warnings=list(result.get("warnings") or []),
    )


@router.get(
    "/{job_id}/plots/{name}.png",
    response_class=StreamingResponse,
    responses={200: {"content": {"image/png": {}}}},
)
def read_job_plot(
    job_id: PathId, name: str, principal: ReadDep, session: SessionDep, store: StoreDep
) -> StreamingResponse:
    """`curves` (loss and accuracy per epoch, updated live) or `confusion_matrix` (at the end)."""
    key = jobs.plot_key(session, store, principal, job_id, name)
    return StreamingResponse(store.iter_chunks(key), media_type="image/png")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(
    request: Request,
    job_id: PathId,
    principal: WriteDep,
    session: SessionDep,
    settings: SettingsDep,
    body: JobCancel | None = None,
) -> JobPublic:
    """A queued job is canceled at once and never starts. A running job stops at its next
    step and releases its worker; `stop-and-keep` makes the best epoch so far its model,
    `discard` (default) keeps nothing. A finished job cannot be canceled (409)."""
    mode = (body or JobCancel()).mode
    job = jobs.cancel_job(session, principal, job_id, mode, client_of(request), settings)
    job_reads.forget_counts(principal.tenant_id)
    return job_public(job)

"""Hosted predictions: `POST /v1/jobs/{id}/predict` with one or more images.

The model is the job's verified `model.onnx`, run by onnxruntime in this process (torch never
enters the API) from a bounded LRU of loaded sessions (`core/inference.py`). Images are
decoded with ingest's decoders and pixel limit and preprocessed exactly as training
evaluated; every refusal names the file and what would be accepted.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, File, Path, Query, Request, UploadFile
from pydantic import BaseModel, Field
from sqlalchemy import Connection, Row

from core import imaging, job_reads, jobs, registry
from core.errors import ErrorCode, ServiceError
from core.inference import Predictor, Predictors
from core.models import Job
from core.settings import Settings
from core.storage import ObjectStore
from core.tenancy import Principal
from service.concurrency import PREDICT_THREADS, TenantThreads
from service.deps import PathId, ReadDep, SettingsDep, StoreDep, in_read, in_session
from service.errors import ERROR_RESPONSES
from service.registry_schemas import ModelRef

router = APIRouter(tags=["predictions"], responses=ERROR_RESPONSES)


class LabelScore(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    filename: str
    top: list[LabelScore] = Field(description="the top-k classes, most probable first")
    labels: list[str] | None = Field(
        None, description="multi-label models: the classes at or over their threshold"
    )
    scores: dict[str, float] | None = Field(
        None, description="multi-label models: every class's sigmoid score"
    )
    thresholds: dict[str, float] | None = Field(
        None, description="multi-label models: each class's decision threshold"
    )


class PredictionsPublic(BaseModel):
    job_id: str
    task: str = Field(description="`single-label` (softmax) or `multi-label` (sigmoids)")
    backbone: str
    input_size: int
    data: list[ImagePrediction]
    count: int


@lru_cache(maxsize=4)
def predictors(size: int, threads: int, spin: bool = False) -> Predictors:
    """One LRU of loaded models per process (per setting, for tests that change them)."""
    return Predictors(size, threads, spin)


@dataclass(frozen=True)
class Served:
    """What a prediction needs from the job row, read once: the row is not touched again,
    so the request's database connection goes back to the pool before any decoding."""

    job_id: str
    status: str
    ready: bool
    result: dict[str, Any]
    missing_onnx: str | None


def served(job: Job | Row[Any]) -> Served:
    result = dict(job.result or {})
    missing = None if result.get("onnx_key") else jobs.missing_format(job, "onnx")
    return Served(job.id, job.status, jobs.model_ready(job), result, missing)


# A request with several images decodes and crops them on its own thread and one helper
# from this pool (Pillow and the crop release the GIL: on 2 cores a batch of 32 PNGs decodes
# in two thirds of the time). One helper per request, and as many helpers as prediction
# threads in all, so a request never queues behind another tenant's images.
_helpers = ThreadPoolExecutor(PREDICT_THREADS, thread_name_prefix="predict-decode")


def _crop(i: int, upload: UploadFile, model: Predictor, settings: Settings) -> Any:
    """Decode one file and keep only the model's crop of it (a few hundred KB)."""
    name = upload.filename or f"files[{i}]"
    data = upload.file.read(settings.max_image_upload_bytes + 1)
    if len(data) > settings.max_image_upload_bytes:
        raise ServiceError(
            ErrorCode.UPLOAD_TOO_LARGE,
            f"{name}: over {settings.max_image_upload_bytes} bytes (MAX_IMAGE_UPLOAD_BYTES)",
        )
    try:
        image = imaging.decode_upload(data, settings.max_image_pixels)
    except ValueError as exc:
        raise ServiceError(
            ErrorCode.IMAGE_INVALID,
            f"{name}: {exc}; send a JPEG, PNG, BMP, GIF, WEBP or TIFF image of at most "
            f"{settings.max_image_pixels} pixels (MAX_IMAGE_PIXELS)",
        ) from exc
    del data
    return imaging.crop_for_model(image, model.metadata)


def _crops(files: list[UploadFile], model: Predictor, settings: Settings) -> list[Any]:
    """Each file's crop, in order, decoded by this thread and one helper taking the files in
    turn: a request holds at most two full-size decoded images at a time. After a bad file
    neither takes another; the first bad one in the request's order is the error, and the
    helper has finished with the files before this returns."""
    if len(files) > settings.predict_max_images:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            f"{len(files)} images in one request; at most {settings.predict_max_images} "
            "(PREDICT_MAX_IMAGES): send them in several requests",
        )
    if len(files) == 1:
        return [_crop(0, files[0], model, settings)]
    crops: list[Any] = [None] * len(files)
    errors: dict[int, BaseException] = {}
    lock = threading.Lock()
    turn = iter(range(len(files)))

    def drain() -> None:
        while True:
            with lock:
                i = None if errors else next(turn, None)  # in increasing order
            if i is None:
                return
            try:
                crops[i] = _crop(i, files[i], model, settings)
            except BaseException as exc:  # noqa: BLE001 - raised below, in order
                with lock:
                    errors[i] = exc

    helper = _helpers.submit(drain)
    drain()
    if not helper.cancel():  # it started: wait for the file it holds
        helper.result()
    if errors:
        raise errors[min(errors)]
    return crops


def predict_served(
    job: Served,
    files: list[UploadFile] | None,
    top_k: int,
    settings: Settings,
    store: ObjectStore,
) -> PredictionsPublic:
    """Predict with the caller's job's model (ownership already checked: before anything
    about the body, so another tenant's job is a 404 whatever it is)."""
    if not job.ready:
        raise ServiceError(
            ErrorCode.MODEL_NOT_AVAILABLE,
            f"job {job.job_id} is {job.status}; predictions are served once it has a model",
        )
    if job.missing_onnx is not None:
        raise ServiceError(ErrorCode.MODEL_NOT_AVAILABLE, job.missing_onnx)
    if not files:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            "no image: send one or more as the multipart form field 'files' (JPEG, PNG, BMP, "
            "GIF, WEBP or TIFF)",
        )
    model = predictors(
        settings.predict_cache_models, settings.predict_threads, settings.predict_spin
    ).get(store, job.result["onnx_key"], job.result["metadata_key"])
    crops = _crops(files, model, settings)
    answers = model.predict_crops(crops, top_k)
    return PredictionsPublic(
        job_id=job.job_id,
        task="multi-label" if model.multilabel else "single-label",
        backbone=str(model.metadata["backbone"]),
        input_size=int(model.metadata["input_size"][1]),
        data=[
            ImagePrediction(filename=f.filename or f"files[{i}]", **answer)
            for i, (f, answer) in enumerate(zip(files, answers, strict=True))
        ],
        count=len(crops),
    )


async def _run(
    request: Request,
    principal: Principal,
    find: Callable[[], Awaitable[Served]],
    files: list[UploadFile] | None,
    top_k: int,
    settings: Settings,
    store: ObjectStore,
) -> PredictionsPublic:
    """Find the job (its connection back in the pool before any decoding), then decode and
    run the model on the tenant's prediction threads (TENANT_PREDICT_THREADS,
    PREDICT_THREADS in all), each with one decoding helper for several images (`_crops`)."""
    job = await find()

    def work() -> PredictionsPublic:
        return predict_served(job, files, top_k, settings, store)

    threads: TenantThreads = request.app.state.predict_threads
    async with threads.of(principal.tenant_id):
        return await anyio.to_thread.run_sync(work, limiter=threads.total)


Files = Annotated[
    list[UploadFile] | None,
    File(description="one or more images (repeat the field): JPEG, PNG, BMP, GIF, WEBP, TIFF"),
]
TopK = Annotated[int, Query(ge=1, le=1000, description="classes per image, best first")]


@router.post("/v1/jobs/{job_id}/predict", response_model=PredictionsPublic)
async def predict(
    request: Request,
    job_id: PathId,
    principal: ReadDep,
    settings: SettingsDep,
    store: StoreDep,
    files: Files = None,
    top_k: TopK = 5,
) -> PredictionsPublic:
    """Per image, the top-k classes with their probabilities (multi-label models: every
    class's score, its threshold and the classes predicted). Preprocessing is exactly the
    training evaluation's. 409 while the job has no model."""
    # One Core read on the autocommit engine (inline on SQLite): the predict route is
    # latency-bound, and an ORM session costs two more thread hops (open, close).
    find = partial(in_read, settings, partial(_owned, principal, job_id), bounded=True)
    return await _run(request, principal, find, files, top_k, settings, store)


def _owned(principal: Principal, job_id: str, conn: Connection) -> Served:
    return served(job_reads.owned_job(conn, principal, job_id))


@router.post("/v1/models/{ref}/predict", response_model=PredictionsPublic)
async def predict_model(
    request: Request,
    ref: Annotated[ModelRef, Path(max_length=80)],
    principal: ReadDep,
    settings: SettingsDep,
    store: StoreDep,
    files: Files = None,
    top_k: TopK = 5,
) -> PredictionsPublic:
    """As `POST /v1/jobs/{id}/predict`, with a registry reference: a model id, `name` (its
    latest version), `name@3` or `name@production`."""
    find = partial(in_session, settings, lambda s: served(registry.resolve(s, principal, ref)))
    return await _run(request, principal, find, files, top_k, settings, store)

"""Hosted predictions: `POST /v1/jobs/{id}/predict` with one or more images.

The model is the job's verified `model.onnx`, run by onnxruntime in this process (torch never
enters the API) from a bounded LRU of loaded sessions (`core/inference.py`). Images are
decoded with ingest's decoders and pixel limit and preprocessed exactly as training
evaluated; every refusal names the file and what would be accepted.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, File, Path, Query, UploadFile
from pydantic import BaseModel, Field

from core import imaging, jobs, registry
from core.errors import ErrorCode, ServiceError
from core.inference import Predictors
from core.models import Job
from core.settings import Settings
from core.storage import ObjectStore
from service.deps import PathId, ReadDep, SessionDep, SettingsDep, StoreDep
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
def predictors(size: int, threads: int) -> Predictors:
    """One LRU of loaded models per process (per setting, for tests that change them)."""
    return Predictors(size, threads)


def _read_images(files: list[UploadFile], settings: Settings) -> list[tuple[str, Any]]:
    if len(files) > settings.predict_max_images:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            f"{len(files)} images in one request; at most {settings.predict_max_images} "
            "(PREDICT_MAX_IMAGES): send them in several requests",
        )
    images = []
    for i, upload in enumerate(files):
        name = upload.filename or f"files[{i}]"
        data = upload.file.read(settings.max_image_upload_bytes + 1)
        if len(data) > settings.max_image_upload_bytes:
            raise ServiceError(
                ErrorCode.UPLOAD_TOO_LARGE,
                f"{name}: over {settings.max_image_upload_bytes} bytes (MAX_IMAGE_UPLOAD_BYTES)",
            )
        try:
            images.append((name, imaging.decode_upload(data, settings.max_image_pixels)))
        except ValueError as exc:
            raise ServiceError(
                ErrorCode.IMAGE_INVALID,
                f"{name}: {exc}; send a JPEG, PNG, BMP, GIF, WEBP or TIFF image of at most "
                f"{settings.max_image_pixels} pixels (MAX_IMAGE_PIXELS)",
            ) from exc
    return images


def predict_job(
    job: Job, files: list[UploadFile] | None, top_k: int, settings: Settings, store: ObjectStore
) -> PredictionsPublic:
    """Predict with `job`'s model (already checked to be the caller's: the ownership check
    comes before anything about the body, so another tenant's job is a 404 whatever it is)."""
    result = job.result or {}
    if not jobs.model_ready(job):
        raise ServiceError(
            ErrorCode.MODEL_NOT_AVAILABLE,
            f"job {job.id} is {job.status}; predictions are served once it has a model",
        )
    if not result.get("onnx_key"):
        raise ServiceError(ErrorCode.MODEL_NOT_AVAILABLE, jobs.missing_format(job, "onnx"))
    if not files:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            "no image: send one or more as the multipart form field 'files' (JPEG, PNG, BMP, "
            "GIF, WEBP or TIFF)",
        )
    images = _read_images(files, settings)
    model = predictors(settings.predict_cache_models, settings.predict_threads).get(
        store, result["onnx_key"], result["metadata_key"]
    )
    answers = model.predict([img for _, img in images], top_k)
    return PredictionsPublic(
        job_id=job.id,
        task="multi-label" if model.multilabel else "single-label",
        backbone=str(model.metadata["backbone"]),
        input_size=int(model.metadata["input_size"][1]),
        data=[
            ImagePrediction(filename=name, **answer)
            for (name, _), answer in zip(images, answers, strict=True)
        ],
        count=len(images),
    )


Files = Annotated[
    list[UploadFile] | None,
    File(description="one or more images (repeat the field): JPEG, PNG, BMP, GIF, WEBP, TIFF"),
]
TopK = Annotated[int, Query(ge=1, le=1000, description="classes per image, best first")]


@router.post("/v1/jobs/{job_id}/predict", response_model=PredictionsPublic)
def predict(
    job_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    files: Files = None,
    top_k: TopK = 5,
) -> PredictionsPublic:
    """Per image, the top-k classes with their probabilities (multi-label models: every
    class's score, its threshold and the classes predicted). Preprocessing is exactly the
    training evaluation's. 409 while the job has no model."""
    job = jobs.get_owned_job(session, principal, job_id)
    return predict_job(job, files, top_k, settings, store)


@router.post("/v1/models/{ref}/predict", response_model=PredictionsPublic)
def predict_model(
    ref: Annotated[ModelRef, Path(max_length=80)],
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    files: Files = None,
    top_k: TopK = 5,
) -> PredictionsPublic:
    """As `POST /v1/jobs/{id}/predict`, with a registry reference: a model id, `name` (its
    latest version), `name@3` or `name@production`."""
    job = registry.resolve(session, principal, ref)
    return predict_job(job, files, top_k, settings, store)

"""Explanations over HTTP: `POST /v1/jobs/{id}/explain` with one image, then its status
and its overlay. The flow (checks, the store's layout, sending the task) is in
`service/explanations.py`; these handlers parse, call it on the tenant's preview threads,
and answer."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, File, Form, Path, UploadFile
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session

from core import queue, registry
from core.jobs import get_owned_job
from core.settings import Settings
from core.storage import ObjectStore
from core.tenancy import Principal
from service.concurrency import RenderSlots
from service.deps import (
    PathId,
    PreviewThreadsDep,
    ReadDep,
    RenderSlotsDep,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from service.errors import ERROR_RESPONSES, ErrorCode, ServiceError
from service.explanations import (
    RETRY_AFTER_SECONDS,
    ExplanationPublic,
    explain_job,
    explanation_state,
    read_object,
    require_model,
)
from service.registry_schemas import ModelRef
from service.schemas import NO_NUL

router = APIRouter(prefix="/v1/jobs", tags=["explanations"], responses=ERROR_RESPONSES)
models_router = APIRouter(prefix="/v1/models", tags=["explanations"], responses=ERROR_RESPONSES)

ExplanationId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]


def answer(explanation: ExplanationPublic) -> JSONResponse:
    """200 once the explanation is done or failed; 202 with Retry-After while pending."""
    if explanation.status == "pending":
        return JSONResponse(
            explanation.model_dump(mode="json"),
            status_code=202,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return JSONResponse(explanation.model_dump(mode="json"))


_PENDING: dict[int | str, dict[str, Any]] = {
    202: {
        "model": ExplanationPublic,
        "description": "being computed by a worker: ask `status_url` again after Retry-After",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    }
}


@router.post("/{job_id}/explain", response_model=ExplanationPublic, responses={**_PENDING})
async def create_explanation(
    job_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    slots: RenderSlotsDep,
    threads: PreviewThreadsDep,
    file: Annotated[
        UploadFile | None, File(description="one image: JPEG, PNG, BMP, GIF, WEBP or TIFF")
    ] = None,
    target: Annotated[
        str | None,
        Form(max_length=200, pattern=NO_NUL, description="a class name; default: predicted"),
    ] = None,
) -> Response:
    """Explain the job's model's prediction for one image with a Grad-CAM overlay. Answers
    202 while a worker computes it (poll `status_url`), 200 when the same image, target
    and model were explained before. 409 while the job has no model."""

    def run(data: bytes) -> ExplanationPublic:
        job = get_owned_job(session, principal, job_id)  # before anything about the body
        if file is None:
            require_model(job)
            raise ServiceError(
                ErrorCode.VALIDATION_ERROR,
                "no image: send it as the multipart form field 'file' (JPEG, PNG, BMP, GIF, "
                "WEBP or TIFF), optionally with a form field 'target' naming a class",
            )
        name = file.filename or "file"
        return explain_job(
            store, settings, slots, principal.tenant_id, job, name, data, target or None
        )

    data = b"" if file is None else await file.read(settings.max_image_upload_bytes + 1)
    async with threads.of(principal.tenant_id):
        explanation = await anyio.to_thread.run_sync(partial(run, data), limiter=threads.total)
    return answer(explanation)


@models_router.post("/{ref}/explain", response_model=ExplanationPublic, responses={**_PENDING})
async def create_model_explanation(
    ref: Annotated[ModelRef, Path(max_length=80)],
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    slots: RenderSlotsDep,
    threads: PreviewThreadsDep,
    file: Annotated[
        UploadFile | None, File(description="one image: JPEG, PNG, BMP, GIF, WEBP or TIFF")
    ] = None,
    target: Annotated[
        str | None,
        Form(max_length=200, pattern=NO_NUL, description="a class name; default: predicted"),
    ] = None,
) -> Response:
    """As `POST /v1/jobs/{id}/explain`, with a registry reference: a model id, `name`,
    `name@3` or `name@production`. The answer's URLs are the model's job's."""

    def run(data: bytes) -> ExplanationPublic:
        job = registry.resolve(session, principal, ref)  # before anything about the body
        if file is None:
            require_model(job)
            raise ServiceError(
                ErrorCode.VALIDATION_ERROR,
                "no image: send it as the multipart form field 'file' (JPEG, PNG, BMP, GIF, "
                "WEBP or TIFF), optionally with a form field 'target' naming a class",
            )
        name = file.filename or "file"
        return explain_job(
            store, settings, slots, principal.tenant_id, job, name, data, target or None
        )

    data = b"" if file is None else await file.read(settings.max_image_upload_bytes + 1)
    async with threads.of(principal.tenant_id):
        explanation = await anyio.to_thread.run_sync(partial(run, data), limiter=threads.total)
    return answer(explanation)


def _owned_state(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    slots: RenderSlots,
    principal: Principal,
    job_id: str,
    eid: str,
) -> ExplanationPublic:
    get_owned_job(session, principal, job_id)
    state = explanation_state(store, settings, slots, principal.tenant_id, job_id, eid)
    if state is None:
        raise ServiceError(
            ErrorCode.EXPLANATION_NOT_FOUND,
            f"job {job_id} has no explanation {eid!r}; ask for one with "
            f"POST /v1/jobs/{job_id}/explain",
        )
    return state


# Registered before the status route: `{explanation_id}` would otherwise match `<id>.png`.
@router.get(
    "/{job_id}/explanations/{explanation_id}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_PENDING},
)
async def read_explanation_image(
    job_id: PathId,
    explanation_id: ExplanationId,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    slots: RenderSlotsDep,
    threads: PreviewThreadsDep,
) -> Response:
    """The overlay PNG: the model's input (its centre crop of the image) with the heatmap
    of the explained class over it. 202 while pending; 422 EXPLANATION_FAILED with why."""

    def run() -> Response:
        state = _owned_state(session, store, settings, slots, principal, job_id, explanation_id)
        if state.status == "failed":
            raise ServiceError(ErrorCode.EXPLANATION_FAILED, f"explaining failed: {state.error}")
        if state.status == "pending":
            return answer(state)
        png = read_object(store, f"{queue.explanation_key(job_id, explanation_id)}.png")
        if png is None:  # evicted between the two reads
            raise ServiceError(ErrorCode.EXPLANATION_NOT_FOUND, "the explanation was removed")
        return Response(png, media_type="image/png")

    async with threads.of(principal.tenant_id):
        return await anyio.to_thread.run_sync(run, limiter=threads.total)


@router.get("/{job_id}/explanations/{explanation_id}", response_model=ExplanationPublic)
async def read_explanation(
    job_id: PathId,
    explanation_id: ExplanationId,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    slots: RenderSlotsDep,
    threads: PreviewThreadsDep,
) -> ExplanationPublic:
    """Where the explanation stands: pending, done (with the prediction) or failed (with
    why). Poll it until it is not pending."""
    run = partial(_owned_state, session, store, settings, slots, principal, job_id, explanation_id)
    async with threads.of(principal.tenant_id):
        return await anyio.to_thread.run_sync(run, limiter=threads.total)

"""The model registry: list, read and update the caller's models, and download one by
reference (`mdl_…`, `name`, `name@3`, `name@production`). The rules live in
`core/registry.py`; these handlers parse, call it, and answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from core import jobs, registry
from core.models import RegisteredModel
from service.deps import (
    Offset,
    ReadDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    WriteDep,
    client_of,
    page,
)
from service.errors import ERROR_RESPONSES
from service.registry_schemas import (
    ModelName,
    ModelPublic,
    ModelRef,
    ModelsPublic,
    ModelUpdate,
    Stage,
    Tag,
    model_public,
)
from service.routes.jobs import MODEL_DOWNLOAD_RESPONSES, ModelFormat, model_response

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)

Ref = Annotated[ModelRef, Path(max_length=80)]


@router.get("", response_model=ModelsPublic)
def list_models(
    principal: ReadDep,
    session: SessionDep,
    name: Annotated[ModelName | None, Query()] = None,
    stage: Annotated[Stage | None, Query()] = None,
    tag: Annotated[Tag | None, Query(description="models carrying this tag")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> ModelsPublic:
    """The models of your succeeded jobs, each name's versions together, the newest first."""
    where = registry.filters(principal, name, stage, tag)
    rows, count = page(session, RegisteredModel, where, registry.ORDER, limit, offset)
    data = [model_public(m, j) for m, j in registry.with_jobs(session, rows)]
    return ModelsPublic(data=data, count=count)


@router.get("/{ref}", response_model=ModelPublic)
def read_model(ref: Ref, principal: ReadDep, session: SessionDep) -> ModelPublic:
    """One model: by id, `name` (its newest version), `name@3` or `name@production`."""
    model = registry.get_model(session, principal, ref)
    return model_public(model, registry.model_job(session, model))


@router.patch("/{ref}", response_model=ModelPublic)
def update_model(
    request: Request, ref: Ref, body: ModelUpdate, principal: WriteDep, session: SessionDep
) -> ModelPublic:
    """Rename (the model becomes the new name's next version), replace the tags, or set the
    stage. Promoting to `production` archives the name's production model before it."""
    model = registry.update_model(
        session,
        principal,
        ref,
        name=body.name,
        tags=body.tags,
        stage=body.stage,
        client=client_of(request),
    )
    return model_public(model, registry.model_job(session, model))


@router.get("/{ref}/download", response_class=StreamingResponse, responses=MODEL_DOWNLOAD_RESPONSES)
def download_model(
    request: Request,
    ref: Ref,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    format: ModelFormat = "zip",  # noqa: A002
) -> Response:
    """The model's files, as `GET /v1/jobs/{id}/model` serves its job's."""
    job = registry.resolve(session, principal, ref)
    model = jobs.open_model(session, store, settings, principal, job.id, format, client_of(request))
    return model_response(store, model)

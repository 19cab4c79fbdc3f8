"""Datasets: upload, import, list, read, samples, delete (the preview is in `previews.py`).
Ingest and storage live in `service/ingest` and `core/datasets.py`; these handlers parse,
call them, and answer.

Upload and import are `async def` so that their ingest (every image decoded) runs on the
INGEST_THREADS threads of its own, not on the pool every other request needs; the tenant's
TENANT_MAX_CONCURRENT_UPLOADS slots were taken before the body was read
(`service.concurrency`)."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile

from core.datasets import delete_dataset as delete_owned_dataset
from core.datasets import get_owned_dataset, read_samples
from core.models import Dataset
from service.deps import (
    IngestLimiterDep,
    LimitsDep,
    Offset,
    PathId,
    ReadDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    WriteDep,
    client_of,
    page,
)
from service.errors import ERROR_RESPONSES
from service.ingest.register import register_import, register_upload
from service.schemas import (
    NO_NUL,
    DatasetImport,
    DatasetPublic,
    DatasetsPublic,
    dataset_public,
)

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=DatasetPublic)
async def create_dataset(
    request: Request,
    principal: WriteDep,
    limits: LimitsDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    ingest: IngestLimiterDep,
    file: Annotated[
        UploadFile, File(description="zip, tar or tar.gz: ImageFolder, train/val/test, or manifest")
    ],
    name: Annotated[str | None, Form(max_length=200, pattern=NO_NUL)] = None,
) -> DatasetPublic:
    """Upload a labeled-image dataset. Every image is decoded and checked before anything
    is stored; files that cannot be used are listed in `rejected` / `skipped`. 429 while
    the tenant has TENANT_MAX_CONCURRENT_UPLOADS uploads or imports in progress."""
    register = partial(
        register_upload,
        session,
        store,
        settings,
        principal,
        limits,
        file.file,  # spooled to disk by the multipart parser past 1 MiB
        file.filename,
        name,
        client_of(request),
    )
    return dataset_public(await anyio.to_thread.run_sync(register, limiter=ingest))


@router.post("/import", status_code=201, response_model=DatasetPublic)
async def import_dataset(
    request: Request,
    principal: WriteDep,
    limits: LimitsDep,
    body: DatasetImport,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    ingest: IngestLimiterDep,
) -> DatasetPublic:
    """Register a dataset that already sits in the object store (`s3://bucket/prefix/` in
    any layout an upload may have), so that large datasets need not pass through the API.
    Allowed only under the prefixes listed in IMPORT_ALLOWED_PREFIXES."""
    register = partial(
        register_import,
        session,
        store,
        settings,
        principal,
        limits,
        body.source,
        body.name,
        client_of(request),
    )
    return dataset_public(await anyio.to_thread.run_sync(register, limiter=ingest))


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    principal: ReadDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> DatasetsPublic:
    live = [Dataset.deleted_at.is_(None), Dataset.tenant_id == principal.tenant_id]
    order = (Dataset.created_at.desc(), Dataset.id)
    rows, count = page(session, Dataset, live, order, limit, offset)
    return DatasetsPublic(data=[dataset_public(d) for d in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def read_dataset(dataset_id: PathId, principal: ReadDep, session: SessionDep) -> DatasetPublic:
    return dataset_public(get_owned_dataset(session, principal, dataset_id))


@router.get(
    "/{dataset_id}/samples.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def read_dataset_samples(
    dataset_id: PathId, principal: ReadDep, session: SessionDep, store: StoreDep
) -> Response:
    """Sample thumbnails, one row per class, with its image count."""
    png = read_samples(session, store, principal, dataset_id)
    return Response(png, media_type="image/png")


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def delete_dataset(
    request: Request, dataset_id: PathId, principal: WriteDep, session: SessionDep, store: StoreDep
) -> Response:
    """Remove a dataset's files. Refused (409) while a queued or running job uses it;
    finished jobs keep their record, their models and the dataset's content hash."""
    delete_owned_dataset(session, store, principal, dataset_id, client_of(request))
    return Response(status_code=204)

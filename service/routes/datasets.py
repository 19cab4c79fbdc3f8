from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from sqlalchemy import func, select

from service.deps import SessionDep, SettingsDep, StoreDep
from service.errors import ErrorCode, ServiceError
from service.ingest import MAX_LISTED, ingest_zip
from service.models import Dataset, new_id
from service.schemas import ClassCount, DatasetPublic, DatasetsPublic, FileIssue
from service.storage import StorageError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def dataset_public(ds: Dataset) -> DatasetPublic:
    report = ds.report or {}
    return DatasetPublic(
        id=ds.id,
        name=ds.name,
        created_at=ds.created_at,
        size_bytes=ds.size_bytes,
        sha256=ds.sha256,
        num_images=ds.num_images,
        num_classes=len(ds.classes),
        classes=[ClassCount(name=c, count=int(ds.class_counts.get(c, 0))) for c in ds.classes],
        rejected=[FileIssue(**r) for r in report.get("rejected", [])[:MAX_LISTED]],
        skipped=[FileIssue(**r) for r in report.get("skipped", [])[:MAX_LISTED]],
    )


@router.post("", status_code=201, response_model=DatasetPublic)
def create_dataset(
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    file: UploadFile = File(description="zip archive, one folder per class"),  # noqa: B008
    name: str | None = Form(None, max_length=200),
) -> DatasetPublic:
    """Upload a labeled-image dataset. Every image is decoded and checked before anything
    is stored; files that cannot be used are listed in `rejected` / `skipped`."""
    src = file.file  # spooled to disk by the multipart parser past 1 MiB
    report = ingest_zip(
        src, max_pixels=settings.max_image_pixels, min_per_class=settings.min_images_per_class
    )

    src.seek(0)
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(1024 * 1024):
        digest.update(chunk)
        size += len(chunk)
    src.seek(0)

    ds_id = new_id("ds")
    prefix = f"datasets/{ds_id}"
    ds = Dataset(
        id=ds_id,
        name=name or (file.filename or ds_id).rsplit(".", 1)[0],
        archive_key=f"{prefix}/archive.zip",
        index_key=f"{prefix}/index.json",
        size_bytes=size,
        sha256=digest.hexdigest(),
        num_images=len(report.entries),
        classes=report.classes,
        class_counts=report.class_counts,
        report={"rejected": report.rejected, "skipped": report.skipped},
    )
    try:
        store.put_stream(ds.archive_key, src)
        store.put_bytes(ds.index_key, json.dumps(report.index()).encode())
        session.add(ds)
        session.commit()
    except StorageError as exc:
        store.delete_prefix(prefix)
        raise ServiceError(
            ErrorCode.STORAGE_UNAVAILABLE, f"could not store the dataset: {exc}"
        ) from exc
    except BaseException:
        session.rollback()
        store.delete_prefix(prefix)
        raise
    log.info("dataset %s created: %d images, %d classes", ds.id, ds.num_images, len(ds.classes))
    return dataset_public(ds)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DatasetsPublic:
    rows = session.scalars(
        select(Dataset).order_by(Dataset.created_at.desc()).limit(limit).offset(offset)
    ).all()
    count = session.scalar(select(func.count()).select_from(Dataset)) or 0
    return DatasetsPublic(data=[dataset_public(d) for d in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def read_dataset(dataset_id: str, session: SessionDep) -> DatasetPublic:
    ds = session.get(Dataset, dataset_id)
    if ds is None:
        raise ServiceError(ErrorCode.DATASET_NOT_FOUND, f"dataset {dataset_id!r} not found")
    return dataset_public(ds)


_preview_slots = threading.BoundedSemaphore(2)  # at most two preview renderers at once


@router.get(
    "/{dataset_id}/augmentations/preview",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def preview_augmentations(
    dataset_id: str,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    preset: Literal["none", "light", "standard", "strong"] = "light",
    hflip: bool = True,
    image_size: Annotated[int, Query(ge=32, le=512)] = 224,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    samples: Annotated[int, Query(ge=1, le=16)] = 8,
) -> Response:
    """A PNG grid: rows are sample images (one class after another), columns are four
    augmented draws, through the same transforms a job with this augmentation uses."""
    if session.get(Dataset, dataset_id) is None:
        raise ServiceError(ErrorCode.DATASET_NOT_FOUND, f"dataset {dataset_id!r} not found")
    augmentation = {"preset": preset, "hflip": hflip}
    params = json.dumps([augmentation, image_size, seed, samples], sort_keys=True)
    key = f"datasets/{dataset_id}/previews/{hashlib.sha256(params.encode()).hexdigest()[:24]}.png"
    if store.exists(key):
        return Response(store.get_bytes(key), media_type="image/png")
    # Rendering needs torch, which the API process never imports: a short-lived process does it.
    with _preview_slots, tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/preview.png"
        cmd = [
            sys.executable,
            "-m",
            "worker.preview",
            dataset_id,
            out,
            json.dumps(augmentation),
            "--image-size",
            str(image_size),
            "--seed",
            str(seed),
            "--samples",
            str(samples),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(ErrorCode.PREVIEW_FAILED, "rendering the preview timed out") from exc
        if proc.returncode != 0:
            log.error("preview failed: %s", proc.stderr[-2000:])
            raise ServiceError(
                ErrorCode.PREVIEW_FAILED,
                f"rendering the preview failed: {proc.stderr.strip().splitlines()[-1:]}",
            )
        png = Path(out).read_bytes()
    store.put_bytes(key, png)
    return Response(png, media_type="image/png")

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

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from sqlalchemy import select

from core.db import utcnow
from core.models import Dataset, Job, JobStatus, Tenant, new_id
from core.settings import Settings
from core.storage import S3ObjectStore, StorageError
from core.tenancy import Limits as TenantLimits
from core.tenancy import Principal, audit, storage_overrun
from service.deps import (
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
from service.errors import ERROR_RESPONSES, ErrorCode, ServiceError
from service.ingest import MAX_LISTED, IngestReport, Limits, ingest_archive, ingest_s3_prefix
from service.ingest.thumbnails import samples_png
from service.schemas import (
    NO_NUL,
    ClassCount,
    DatasetImport,
    DatasetPublic,
    DatasetsPublic,
    FileIssue,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)


def dataset_public(ds: Dataset) -> DatasetPublic:
    report = ds.report or {}
    details = report.get("details", {})
    return DatasetPublic(
        id=ds.id,
        name=ds.name,
        created_at=ds.created_at,
        size_bytes=ds.size_bytes,
        sha256=ds.sha256,
        format=report.get("format", "zip"),
        layout=report.get("layout", "imagefolder"),
        num_images=ds.num_images,
        num_classes=len(ds.classes),
        classes=[ClassCount(name=c, count=int(ds.class_counts.get(c, 0))) for c in ds.classes],
        splits=details.get("counts", {}),
        imbalance_ratio=details.get("imbalance_ratio"),
        image_sizes=details.get("image_sizes"),
        duplicates=details.get("duplicates"),
        leakage=details.get("leakage"),
        conflicting_labels=details.get("conflicting_labels"),
        rejected=[FileIssue(**r) for r in report.get("rejected", [])[:MAX_LISTED]],
        skipped=[FileIssue(**r) for r in report.get("skipped", [])[:MAX_LISTED]],
        num_rejected=report.get("num_rejected", len(report.get("rejected", []))),
        num_skipped=report.get("num_skipped", len(report.get("skipped", []))),
    )


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_pixels=settings.max_image_pixels,
        min_per_class=settings.min_images_per_class,
        max_entries=settings.max_archive_entries,
        max_total_bytes=settings.max_dataset_bytes,
        max_compression_ratio=settings.max_compression_ratio,
    )


def content_hash(report: IngestReport) -> str:
    """Identifies the dataset by what it holds (images, labels, splits), not by how it was
    packed: the same images zipped twice hash the same."""
    digest = hashlib.sha256()
    rows = sorted(
        (e["source"], report.classes[e["label"]], e["split"] or "", e["sha256"])
        for e in report.entries
    )
    digest.update(json.dumps(rows).encode())
    return digest.hexdigest()


def check_storage_quota(
    session: SessionDep, principal: Principal, limits: TenantLimits, adding: int
) -> None:
    """403 STORAGE_LIMIT if `adding` bytes would take the tenant past its storage limit."""
    over = storage_overrun(session, principal.tenant_id, limits.max_storage_bytes, adding)
    if over is not None:
        raise ServiceError(ErrorCode.STORAGE_LIMIT, over)


def store_dataset(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Principal,
    report: IngestReport,
    images_zip: Path,
    name: str,
    size_bytes: int,
) -> Dataset:
    """Write the checked dataset: objects first, then the row; undo the objects on failure.
    The caller has checked the tenant's storage limit."""
    client = client_of(request)
    ds_id = new_id("ds")
    prefix = f"datasets/{ds_id}"
    ds = Dataset(
        id=ds_id,
        tenant_id=principal.tenant_id,
        name=name,
        archive_key=f"{prefix}/images.zip",
        index_key=f"{prefix}/index.json",
        size_bytes=size_bytes,
        sha256=content_hash(report),
        num_images=len(report.entries),
        classes=report.classes,
        class_counts=report.class_counts,
        report={
            "format": report.format,
            "layout": report.layout,
            "rejected": report.rejected[:1000],
            "skipped": report.skipped[:1000],
            "num_rejected": len(report.rejected),
            "num_skipped": len(report.skipped),
            "details": report.details,
        },
    )
    try:
        store.put_file(ds.archive_key, images_zip)
        store.put_bytes(ds.index_key, json.dumps(report.index()).encode())
        store.put_bytes(
            f"{prefix}/samples.png", samples_png(images_zip, report.entries, report.classes)
        )
        session.add(ds)
        audit(
            session,
            principal,
            "dataset.create",
            "dataset",
            ds.id,
            client,
            {"name": name, "size_bytes": size_bytes, "images": ds.num_images},
        )
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
    return ds


@router.post("", status_code=201, response_model=DatasetPublic)
def create_dataset(
    request: Request,
    principal: WriteDep,
    limits: LimitsDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    file: Annotated[
        UploadFile, File(description="zip, tar or tar.gz: ImageFolder, train/val/test, or manifest")
    ],
    name: Annotated[str | None, Form(max_length=200, pattern=NO_NUL)] = None,
) -> DatasetPublic:
    """Upload a labeled-image dataset. Every image is decoded and checked before anything
    is stored; files that cannot be used are listed in `rejected` / `skipped`."""
    src = file.file  # spooled to disk by the multipart parser past 1 MiB
    size = src.seek(0, 2)
    check_storage_quota(session, principal, limits, size)  # before any decoding
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        images_zip = Path(tmp) / "images.zip"
        report = ingest_archive(src, images_zip, limits_from(settings))
        stem = (file.filename or "dataset").split("/")[-1]
        for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
            stem = stem.removesuffix(suffix)
        ds = store_dataset(
            request, session, store, principal, report, images_zip, name or stem, size
        )
    return dataset_public(ds)


@router.post("/import", status_code=201, response_model=DatasetPublic)
def import_dataset(
    request: Request,
    principal: WriteDep,
    limits: LimitsDep,
    body: DatasetImport,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
) -> DatasetPublic:
    """Register a dataset that already sits in the object store (`s3://bucket/prefix/` in
    any layout an upload may have), so that large datasets need not pass through the API.
    Allowed only under the prefixes listed in IMPORT_ALLOWED_PREFIXES."""
    tenant_name = session.get(Tenant, principal.tenant_id).name  # type: ignore[union-attr]
    allowed = [
        p.replace("{tenant}", tenant_name).rstrip("/") + "/"
        for p in settings.import_allowed_prefixes
    ]
    source = body.source.rstrip("/") + "/"
    if not isinstance(store, S3ObjectStore) or not any(source.startswith(p) for p in allowed):
        raise ServiceError(
            ErrorCode.IMPORT_NOT_ALLOWED,
            f"importing {body.source!r} is not allowed here; allowed prefixes: "
            f"{', '.join(allowed) or 'none (set IMPORT_ALLOWED_PREFIXES with STORAGE_BACKEND=s3)'}",
        )
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        images_zip = Path(tmp) / "images.zip"
        report = ingest_s3_prefix(store.client, body.source, images_zip, limits_from(settings))
        name = body.name or source.rstrip("/").rsplit("/", 1)[-1]
        size = images_zip.stat().st_size
        check_storage_quota(session, principal, limits, size)
        ds = store_dataset(request, session, store, principal, report, images_zip, name, size)
    return dataset_public(ds)


def get_owned_dataset(session: SessionDep, principal: Principal, dataset_id: str) -> Dataset:
    """The caller's live dataset; another tenant's is exactly as absent as a missing one."""
    ds = session.get(Dataset, dataset_id)
    if ds is None or ds.deleted_at is not None or ds.tenant_id != principal.tenant_id:
        raise ServiceError(ErrorCode.DATASET_NOT_FOUND, f"dataset {dataset_id!r} not found")
    return ds


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
    ds = get_owned_dataset(session, principal, dataset_id)
    key = ds.archive_key.rsplit("/", 1)[0] + "/samples.png"
    return Response(store.get_bytes(key), media_type="image/png")


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def delete_dataset(
    request: Request, dataset_id: PathId, principal: WriteDep, session: SessionDep, store: StoreDep
) -> Response:
    """Remove a dataset's files. Refused (409) while a queued or running job uses it;
    finished jobs keep their record, their models and the dataset's content hash."""
    ds = get_owned_dataset(session, principal, dataset_id)
    active = session.scalars(
        select(Job.id).where(
            Job.dataset_id == ds.id,
            Job.status.in_(
                [JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.INTERRUPTED.value]
            ),
        )
    ).all()
    if active:
        raise ServiceError(
            ErrorCode.DATASET_IN_USE,
            f"dataset {dataset_id} is used by {len(active)} unfinished job(s) "
            f"({', '.join(active[:5])}); cancel them or wait for them to finish",
        )
    ds.deleted_at = utcnow()
    audit(session, principal, "dataset.delete", "dataset", ds.id, client_of(request))
    session.commit()
    store.delete_prefix(ds.archive_key.rsplit("/", 1)[0])
    return Response(status_code=204)


_preview_slots = threading.BoundedSemaphore(2)  # at most two preview renderers at once


@router.get(
    "/{dataset_id}/augmentations/preview",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def preview_augmentations(
    dataset_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    store: StoreDep,
    preset: Literal["none", "light", "standard", "strong"] = "light",
    hflip: bool = True,
    image_size: Annotated[int, Query(ge=32, le=512)] = 224,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    samples: Annotated[int, Query(ge=1, le=16)] = 8,
) -> Response:
    """A PNG grid: rows are sample images (one class after another), columns are four
    augmented draws, through the same transforms a job with this augmentation uses."""
    get_owned_dataset(session, principal, dataset_id)
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

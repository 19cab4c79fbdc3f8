"""Datasets as rows and objects: ownership, the storage quota, storing a checked dataset,
reading its samples, deleting it, and where an import may read from.

A dataset is written objects first, then its row; a failure on the way deletes the objects,
so that a row never points at missing objects and nothing is left without a row. Checking
the images themselves is the ingest's job (`service/ingest`), done before anything here runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import utcnow
from core.errors import ErrorCode, ServiceError
from core.models import Dataset, Job, JobStatus, Tenant, new_id
from core.settings import Settings
from core.storage import ObjectStore, S3ObjectStore, StorageError
from core.tenancy import Limits, Principal, audit, storage_overrun

log = logging.getLogger(__name__)

# A dataset in these states of a job's may not be deleted: the job still reads it.
UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.INTERRUPTED.value)


@dataclass(frozen=True)
class NewDataset:
    """A checked dataset, ready to store: the row's values and the objects beside it."""

    name: str
    size_bytes: int
    sha256: str  # content hash: images, labels and splits
    num_images: int
    classes: list[str]
    class_counts: dict[str, int]
    report: dict[str, Any]  # layout, rejected and skipped files, details
    archive: Path  # the canonical zip the workers train from
    index: bytes  # index.json
    samples_png: bytes


def get_owned_dataset(session: Session, principal: Principal, dataset_id: str) -> Dataset:
    """The caller's live dataset; another tenant's is exactly as absent as a missing one."""
    ds = session.get(Dataset, dataset_id)
    if ds is None or ds.deleted_at is not None or ds.tenant_id != principal.tenant_id:
        raise ServiceError(ErrorCode.DATASET_NOT_FOUND, f"dataset {dataset_id!r} not found")
    return ds


def check_storage_quota(
    session: Session, principal: Principal, limits: Limits, adding: int
) -> None:
    """STORAGE_LIMIT if `adding` bytes would take the tenant past its storage limit."""
    over = storage_overrun(session, principal.tenant_id, limits.max_storage_bytes, adding)
    if over is not None:
        raise ServiceError(ErrorCode.STORAGE_LIMIT, over)


def importable_store(
    session: Session, settings: Settings, store: ObjectStore, principal: Principal, source: str
) -> S3ObjectStore:
    """The S3 store `source` may be imported from, or IMPORT_NOT_ALLOWED: only under the
    prefixes of IMPORT_ALLOWED_PREFIXES (`{tenant}` there is the caller's tenant name)."""
    tenant_name = session.get(Tenant, principal.tenant_id).name  # type: ignore[union-attr]
    allowed = [
        p.replace("{tenant}", tenant_name).rstrip("/") + "/"
        for p in settings.import_allowed_prefixes
    ]
    prefix = source.rstrip("/") + "/"
    if not isinstance(store, S3ObjectStore) or not any(prefix.startswith(p) for p in allowed):
        raise ServiceError(
            ErrorCode.IMPORT_NOT_ALLOWED,
            f"importing {source!r} is not allowed here; allowed prefixes: "
            f"{', '.join(allowed) or 'none (set IMPORT_ALLOWED_PREFIXES with STORAGE_BACKEND=s3)'}",
        )
    return store


def store_dataset(
    session: Session,
    store: ObjectStore,
    principal: Principal,
    new: NewDataset,
    client: str | None = None,
) -> Dataset:
    """Write the checked dataset: objects first, then the row; undo the objects on failure.
    The caller has checked the tenant's storage limit."""
    ds_id = new_id("ds")
    prefix = f"datasets/{ds_id}"
    ds = Dataset(
        id=ds_id,
        tenant_id=principal.tenant_id,
        name=new.name,
        archive_key=f"{prefix}/images.zip",
        index_key=f"{prefix}/index.json",
        size_bytes=new.size_bytes,
        sha256=new.sha256,
        num_images=new.num_images,
        classes=new.classes,
        class_counts=new.class_counts,
        report=new.report,
    )
    try:
        store.put_file(ds.archive_key, new.archive)
        store.put_bytes(ds.index_key, new.index)
        store.put_bytes(_samples_key(ds), new.samples_png)
        session.add(ds)
        audit(
            session,
            principal,
            "dataset.create",
            "dataset",
            ds.id,
            client,
            {"name": new.name, "size_bytes": new.size_bytes, "images": ds.num_images},
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


def _prefix(ds: Dataset) -> str:
    return ds.archive_key.rsplit("/", 1)[0]


def _samples_key(ds: Dataset) -> str:
    return f"{_prefix(ds)}/samples.png"


def read_samples(
    session: Session, store: ObjectStore, principal: Principal, dataset_id: str
) -> bytes:
    """The caller's dataset's sample thumbnails (a PNG, one row per class)."""
    return store.get_bytes(_samples_key(get_owned_dataset(session, principal, dataset_id)))


def delete_dataset(
    session: Session,
    store: ObjectStore,
    principal: Principal,
    dataset_id: str,
    client: str | None = None,
) -> None:
    """Remove a dataset's files; DATASET_IN_USE while an unfinished job uses it. The row
    stays (soft-deleted) so finished jobs keep their record and the content hash."""
    ds = get_owned_dataset(session, principal, dataset_id)
    active = session.scalars(
        select(Job.id).where(Job.dataset_id == ds.id, Job.status.in_(UNFINISHED))
    ).all()
    if active:
        raise ServiceError(
            ErrorCode.DATASET_IN_USE,
            f"dataset {dataset_id} is used by {len(active)} unfinished job(s) "
            f"({', '.join(active[:5])}); cancel them or wait for them to finish",
        )
    ds.deleted_at = utcnow()
    audit(session, principal, "dataset.delete", "dataset", ds.id, client)
    session.commit()
    # After the commit: a failed delete leaves orphan objects, never a row without them.
    store.delete_prefix(_prefix(ds))

"""Datasets as rows and objects: ownership, the storage quota, storing a checked dataset,
reading its samples, deleting it, and where an import may read from.

A dataset is written objects first, then its row; a failure on the way deletes the objects,
so that a row never points at missing objects and nothing is left without a row. Checking
the images themselves is the ingest's job (`service/ingest`), done before anything here runs.

Two checks must hold against concurrent requests, so each is made again under a lock, in
the transaction that commits the change (`locked`):
- the storage quota, charged on the bytes the store holds, under the tenant's row: two
  uploads that each fit alone cannot both be kept when together they do not fit;
- a dataset in use is not deleted, under the dataset's row, which submitting a job locks
  too: a job is never queued on a dataset that is gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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

# SQLite has no row locks; the embedded API is one process, so one lock of its own serves.
_EMBEDDED_LOCK = threading.RLock()

log = logging.getLogger(__name__)

# A dataset in these states of a job's may not be deleted: the job still reads it.
UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.INTERRUPTED.value)


@dataclass(frozen=True)
class NewDataset:
    """A checked dataset, ready to store: the row's values and the objects beside it."""

    name: str
    size_bytes: int  # as received
    sha256: str  # content hash: images, labels and splits
    num_images: int
    classes: list[str]
    class_counts: dict[str, int]
    report: dict[str, Any]  # layout, rejected and skipped files, details
    archive: Path  # the canonical zip the workers train from
    index: bytes  # index.json
    samples_png: bytes

    @property
    def stored_bytes(self) -> int:
        """What the store will hold for it: the quota charges these, not the upload's."""
        return self.archive.stat().st_size + len(self.index) + len(self.samples_png)


@contextmanager
def locked(session: Session, model: type[Any], key: str) -> Iterator[Any]:
    """Row `key` of `model`, read afresh and held against every other `locked` of it until
    the block's commit (or its rollback, on an exception). PostgreSQL: SELECT ... FOR NO KEY
    UPDATE, which does not block inserts that merely reference the row."""
    if session.get_bind().dialect.name == "sqlite":
        with _EMBEDDED_LOCK:
            try:
                yield session.get(model, key, populate_existing=True)
            except BaseException:
                session.rollback()
                raise
        return
    try:
        yield session.get(model, key, populate_existing=True, with_for_update={"key_share": True})
    except BaseException:
        session.rollback()
        raise


def get_owned_dataset(session: Session, principal: Principal, dataset_id: str) -> Dataset:
    """The caller's live dataset; another tenant's is exactly as absent as a missing one."""
    ds = session.get(Dataset, dataset_id)
    if ds is None or ds.deleted_at is not None or ds.tenant_id != principal.tenant_id:
        raise ServiceError(ErrorCode.DATASET_NOT_FOUND, f"dataset {dataset_id!r} not found")
    return ds


def check_storage_quota(
    session: Session, principal: Principal, limits: Limits, adding: int
) -> None:
    """STORAGE_LIMIT if `adding` bytes would take the tenant past its storage limit. An early
    refusal only: `store_dataset` checks again, atomically, with the bytes it stores."""
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
    limits: Limits,
    new: NewDataset,
    client: str | None = None,
) -> Dataset:
    """Write the checked dataset: objects first, then the row; undo the objects on failure.
    STORAGE_LIMIT (nothing stored) when its stored bytes do not fit the tenant's limit."""
    stored = new.stored_bytes
    check_storage_quota(session, principal, limits, stored)  # before writing anything
    ds_id = new_id("ds")
    prefix = f"datasets/{ds_id}"
    ds = Dataset(
        id=ds_id,
        tenant_id=principal.tenant_id,
        name=new.name,
        archive_key=f"{prefix}/images.zip",
        index_key=f"{prefix}/index.json",
        size_bytes=new.size_bytes,
        stored_bytes=stored,
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
        # Again under the tenant's row: uploads that were checked at the same time above
        # are counted here one after the other, each seeing the ones committed before it.
        with locked(session, Tenant, principal.tenant_id):
            check_storage_quota(session, principal, limits, stored)
            session.add(ds)
            audit(
                session,
                principal,
                "dataset.create",
                "dataset",
                ds.id,
                client,
                {
                    "name": new.name,
                    "size_bytes": new.size_bytes,
                    "stored_bytes": stored,
                    "images": ds.num_images,
                },
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
    log.info(
        "dataset %s created: %d images, %d classes, %d bytes stored",
        ds.id,
        ds.num_images,
        len(ds.classes),
        stored,
    )
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
    get_owned_dataset(session, principal, dataset_id)
    # Under the dataset's row, which a job submit holds until its job is committed: the
    # jobs read here include every job that will ever be queued on it.
    with locked(session, Dataset, dataset_id) as ds:
        if ds.deleted_at is not None:
            raise ServiceError(ErrorCode.DATASET_NOT_FOUND, f"dataset {dataset_id!r} not found")
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

"""From an upload (or an S3 prefix) to a stored dataset: refuse an upload that cannot fit
the tenant's storage early, ingest, then store through `core.datasets` (which charges, and
checks, the bytes actually stored). The dataset routes call these."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from core.datasets import NewDataset, check_storage_quota, importable_store, store_dataset
from core.models import Dataset
from core.settings import Settings
from core.storage import ObjectStore
from core.tenancy import Limits as TenantLimits
from core.tenancy import Principal
from service.ingest.model import IngestReport, Limits
from service.ingest.pipeline import ingest_archive, ingest_s3_prefix
from service.ingest.thumbnails import samples_png

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def register_upload(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    principal: Principal,
    limits: TenantLimits,
    src: BinaryIO,
    filename: str | None,
    name: str | None = None,
    client: str | None = None,
) -> Dataset:
    """An uploaded archive (a seekable file on disk), named `name` or after its file."""
    size = src.seek(0, 2)
    # Before any decoding, like the Content-Length check in front of the route.
    check_storage_quota(session, principal, limits, size)
    _release_connection(session)
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        images_zip = Path(tmp) / "images.zip"
        report = ingest_archive(src, images_zip, Limits.from_settings(settings))
        stem = (filename or "dataset").split("/")[-1]
        for suffix in ARCHIVE_SUFFIXES:
            stem = stem.removesuffix(suffix)
        new = _checked(report, images_zip, name or stem, size)
        return store_dataset(session, store, principal, limits, new, client)


def register_import(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    principal: Principal,
    limits: TenantLimits,
    source: str,
    name: str | None = None,
    client: str | None = None,
) -> Dataset:
    """The objects under `source` (s3://bucket/prefix/), read in place, where allowed."""
    s3 = importable_store(session, settings, store, principal, source)
    _release_connection(session)
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        images_zip = Path(tmp) / "images.zip"
        report = ingest_s3_prefix(s3.client, source, images_zip, Limits.from_settings(settings))
        size = images_zip.stat().st_size
        new = _checked(report, images_zip, name or source.rstrip("/").rsplit("/", 1)[-1], size)
        return store_dataset(session, store, principal, limits, new, client)


def _release_connection(session: Session) -> None:
    """End the session's read-only transaction, so that its connection goes back to the
    pool for the seconds or minutes the images take to decode; `store_dataset` takes one
    again to commit."""
    session.rollback()


def _checked(report: IngestReport, images_zip: Path, name: str, size: int) -> NewDataset:
    return NewDataset(
        name=name,
        size_bytes=size,
        sha256=report.content_hash(),
        num_images=len(report.entries),
        classes=report.classes,
        class_counts=report.class_counts,
        report=report.summary(),
        archive=images_zip,
        index=json.dumps(report.index()).encode(),
        samples_png=samples_png(images_zip, report.entries, report.classes),
    )

"""The worker host's copies of datasets: one folder per dataset under
`WORKER_CACHE_DIR/datasets/`, holding its archive and the decoded image arrays `prepare`
builds beside it. Datasets are immutable, so a copy stays good until its dataset is deleted.

Several worker processes on a host share the cache (`serve` runs a training and a light
worker), so a folder's use is marked with a lock the kernel holds for the process: a job or
preview holds its dataset's folder with a shared lock (`in_use`) while it reads it, and a
folder is removed only under an exclusive lock taken without waiting, so nothing is pulled
from under a reader, and a killed reader never leaves a stale mark. Removed, by `tidy` (each
worker's reaper round) and `trim` (after a job's data is ready): folders of datasets deleted
or gone from the database, and the least recently used ones while the cache is over
`WORKER_CACHE_MAX_BYTES`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select

from core.db import session_scope
from core.models import Dataset
from core.settings import Settings

log = logging.getLogger(__name__)

LOCK = ".lock"  # its mtime is the folder's last use
TRASH = ".removing-"  # a folder on its way out (renamed under its lock, then deleted)


def datasets_dir(settings: Settings) -> Path:
    return settings.resolved_worker_cache_dir / "datasets"


def dataset_dir(settings: Settings, dataset_id: str) -> Path:
    return datasets_dir(settings) / dataset_id


def _same_file(fd: int, path: Path) -> bool:
    """Whether the lock we hold is still the one at `path` (not one removed meanwhile)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)


def _touch(lock: Path) -> None:
    with contextlib.suppress(OSError):  # last use is a hint for eviction, never a failure
        os.utime(lock)


@contextmanager
def in_use(settings: Settings, dataset_id: str) -> Iterator[Path]:
    """The dataset's cache folder, kept from removal until the block ends."""
    folder = dataset_dir(settings, dataset_id)
    lock = folder / LOCK
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileExistsError, FileNotFoundError):  # a remover renamed it meanwhile
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a remover renames the folder
        if _same_file(fd, lock):
            break
        os.close(fd)  # the folder was removed while we waited: make it again
    try:
        _touch(lock)
        yield folder
    finally:
        _touch(lock)
        os.close(fd)


def _remove_unless_in_use(folder: Path) -> bool:
    """Remove `folder` if nobody holds it. Renamed away first, under the lock, so a reader
    that comes next makes a fresh folder instead of finding a half-removed one."""
    lock = folder / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a job or preview reads it
        if not _same_file(fd, lock):
            return False
        trash = folder.with_name(f"{TRASH}{folder.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(folder, trash)
        except OSError:
            return False
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _cached(settings: Settings) -> list[Path]:
    root = datasets_dir(settings)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile (a finished .part file)
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def _last_used(folder: Path) -> float:
    try:
        return (folder / LOCK).stat().st_mtime
    except OSError:
        try:
            return folder.stat().st_mtime
        except OSError:
            return 0.0


def drop_deleted(settings: Settings) -> list[str]:
    """Remove the copies of datasets that are deleted, or have no row at all. Returns their
    ids. A copy in use stays until a later round (a job never uses a deleted dataset: the
    delete is refused while one is unfinished; a preview may race it, harmlessly)."""
    folders = {p.name: p for p in _cached(settings)}
    if not folders:
        return []
    ids = sorted(folders)
    live: set[str] = set()
    with session_scope(settings) as s:
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            live.update(
                s.scalars(
                    select(Dataset.id).where(Dataset.id.in_(chunk), Dataset.deleted_at.is_(None))
                ).all()
            )
    dropped = [i for i in ids if i not in live and _remove_unless_in_use(folders[i])]
    for dataset_id in dropped:
        log.info("dropped the cached copy of deleted dataset %s", dataset_id)
    return dropped


def trim(settings: Settings) -> list[str]:
    """Evict whole dataset folders, least recently used first, until the cache fits in
    WORKER_CACHE_MAX_BYTES; folders in use are skipped. Returns the evicted ids."""
    limit = settings.worker_cache_max_bytes
    folders = _cached(settings)
    sizes = {p: _size(p) for p in folders}
    total = sum(sizes.values())
    evicted: list[str] = []
    for folder in sorted(folders, key=_last_used):
        if total <= limit:
            break
        if _remove_unless_in_use(folder):
            total -= sizes[folder]
            evicted.append(folder.name)
            log.info("evicted dataset %s from the cache (%d bytes)", folder.name, sizes[folder])
    if total > limit:
        log.warning(
            "worker cache holds %d bytes, over WORKER_CACHE_MAX_BYTES (%d): the rest is in use",
            total,
            limit,
        )
    return evicted


def tidy(settings: Settings) -> None:
    """One round of the worker's reaper: deleted datasets out, then back under the limit."""
    root = datasets_dir(settings)
    if root.is_dir():  # left by a process killed while it deleted them
        for trash in root.glob(f"{TRASH}*"):
            shutil.rmtree(trash, ignore_errors=True)
    drop_deleted(settings)
    trim(settings)

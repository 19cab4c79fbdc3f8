"""Scratch folders of the jobs in progress on this host: a job's working copy (its dataset
and checkpoints on local disk) and the files a multi-GPU job's ranks share.

A folder is removed by whoever made it when the job ends. A worker killed with SIGKILL (or
by the kernel's OOM killer) removes nothing, and every such folder would stay on disk for
good. So each folder holds an `flock` on its `.owner` file for as long as its maker lives
(the kernel drops the lock when the process dies, however it dies), and a worker, at start,
removes every scratch folder whose lock it can take: their makers are gone. Folders of jobs
running in other workers on the same host keep their locks and are left alone. Workers sweep
at start and at each reaper round (a prefork child killed alone is replaced without a
restart; a killed maker's forked data-loader processes may hold its lock a few seconds).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "finetune-scratch-"
OWNER = ".owner"
# A folder without its lock file yet (between mkdtemp and the flock) is this young at most.
UNLOCKED_GRACE_SECONDS = 60.0

_held: dict[Path, int] = {}  # folder -> the descriptor holding its lock


def make(label: str, root: str | None = None) -> Path:
    """A new scratch folder, locked by this process until `release`."""
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{label}-", dir=root))
    # Locked under another name, then renamed (the same inode, still locked): a sweep never
    # sees an `.owner` it could lock between its creation and our flock.
    pending = path / f"{OWNER}.pending"
    fd = os.open(pending, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(pending, path / OWNER)
    except BaseException:
        os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        raise
    _held[path] = fd
    return path


def release(path: Path) -> None:
    """Remove a folder made by `make` (its contents too) and drop its lock."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def sweep(root: str | None = None) -> list[Path]:
    """Remove the scratch folders under `root` (the system's temporary folder) whose maker
    died; return them."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if path in _held or not path.is_dir():
            continue
        try:
            fd = os.open(path / OWNER, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                young = time.time() - path.stat().st_mtime < UNLOCKED_GRACE_SECONDS
            except FileNotFoundError:
                continue
            if young:  # being made right now
                continue
        except OSError:
            continue  # another user's, or unreadable: not ours to judge
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its maker is alive
            finally:
                os.close(fd)  # closing drops the lock we may have taken
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.warning(
            "removed %d scratch folder(s) left by killed workers: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed

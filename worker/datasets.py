"""The worker's copy of a dataset: the canonical images zip, cached on local disk per
dataset (datasets are immutable, see worker/cache.py), and its index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.settings import Settings
from core.storage import ObjectStore, StorageNotFound
from worker.cache import dataset_dir


class DatasetFilesMissing(RuntimeError):
    """The dataset's row is there but its objects are not: deleted behind the service's back
    (or the store was swapped). Not transient: no retry brings them back."""


def fetch_dataset(
    settings: Settings, store: ObjectStore, dataset_id: str, archive_key: str, index_key: str
) -> tuple[Path, dict[str, Any]]:
    """(local images.zip, index). The zip is downloaded once per worker host; its folder also
    holds the decoded image caches `prepare` builds beside it. Call it inside
    `worker.cache.in_use`, so the folder is not evicted while it is read."""
    archive = dataset_dir(settings, dataset_id) / "images.zip"
    try:
        if not archive.is_file():
            store.get_file(archive_key, archive)
        index = json.loads(store.get_bytes(index_key))
    except StorageNotFound as exc:
        raise DatasetFilesMissing(
            f"the files of dataset {dataset_id} are gone from the object store "
            f"(was the dataset deleted?): {exc}"
        ) from exc
    return archive, index

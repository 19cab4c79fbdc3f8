"""Render a PNG grid of augmented training samples, exactly as a job would see them.

Runs as the `finetune.render_preview` task on the light queue. The API (which never imports
torch) serves what this writes next to the preview's key (see `core.queue.preview_key`):
`<key>.png` once rendered, `<key>.error.json` when rendering failed for good; either way the
API's `<key>.pending` marker is removed.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from core.db import session_scope
from core.jobspec import Augmentation, JobSpec
from core.models import Dataset
from core.queue import preview_key
from core.settings import Settings, get_settings
from core.storage import get_store
from worker.cache import in_use
from worker.datasets import fetch_dataset
from worker.failures import is_transient
from worker.training.augment import batch_mixing, train_transform
from worker.training.data import resize_center_crop

log = logging.getLogger(__name__)

VARIANTS = 4  # augmented draws per sample image


def pick_samples(entries: list[dict], n: int, seed: int) -> list[dict]:
    """Round-robin over classes so every class shows up before any repeats."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[dict]] = {}
    for e in entries:
        by_class.setdefault(int(e["label"]), []).append(e)
    for items in by_class.values():
        rng.shuffle(items)  # type: ignore[arg-type]
    picked: list[dict] = []
    while len(picked) < n and any(by_class.values()):
        for label in sorted(by_class):
            if by_class[label] and len(picked) < n:
                picked.append(by_class[label].pop())
    return picked


def render(
    archive: Path,
    index: dict[str, Any],
    classes: list[str],
    augmentation: dict[str, Any],
    image_size: int,
    seed: int,
    samples: int,
) -> bytes:
    """Rows are sample images (one class after another), columns are augmented draws."""
    config = JobSpec(image_size=image_size, seed=seed, augmentation=Augmentation(**augmentation))
    transform = train_transform(config)
    mixing = batch_mixing(config, len(classes))
    torch.manual_seed(seed)
    chosen = pick_samples(index["entries"], samples, seed)
    rows = []
    with zipfile.ZipFile(archive) as zf:
        for entry in chosen:
            with zf.open(entry["path"]) as f, Image.open(f) as img:
                base = resize_center_crop(img, config.resize_size, config.spec.interpolation)
            tensor = torch.from_numpy(np.array(base)).permute(2, 0, 1)
            rows.append(torch.stack([transform(tensor) for _ in range(VARIANTS)]))
    batch = torch.cat(rows)
    if mixing is not None:
        labels = torch.tensor([int(e["label"]) for e in chosen]).repeat_interleave(VARIANTS)
        batch, _ = mixing(batch, labels)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    pixels = ((batch * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()

    label_w, pad = 120, 4
    cell = image_size + pad
    grid = Image.new("RGB", (label_w + VARIANTS * cell, len(chosen) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, entry in enumerate(chosen):
        draw.text((4, r * cell + cell // 2 - 6), classes[int(entry["label"])][:18], fill="black")
        for c in range(VARIANTS):
            grid.paste(Image.fromarray(pixels[r * VARIANTS + c]), (label_w + c * cell, r * cell))
    buf = BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def render_to_store(
    dataset_id: str,
    augmentation: dict[str, Any],
    image_size: int,
    seed: int,
    samples: int,
    settings: Settings | None = None,
) -> str:
    """Render the preview and store it (or why it failed). Returns what happened."""
    settings = settings or get_settings()
    store = get_store(settings)
    key = preview_key(dataset_id, augmentation, image_size, seed, samples)
    if store.exists(f"{key}.png"):  # a re-sent task for a preview already done
        store.delete_prefix(f"{key}.pending")
        return "cached"
    with session_scope(settings) as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None or ds.deleted_at is not None:
            # Deleted since the request: its previews folder is gone; write nothing into it.
            log.info("preview of dataset %s skipped: the dataset is gone", dataset_id)
            return "gone"
        archive_key, index_key, classes = ds.archive_key, ds.index_key, list(ds.classes)
    try:
        with in_use(settings, dataset_id):
            archive, index = fetch_dataset(settings, store, dataset_id, archive_key, index_key)
            png = render(archive, index, classes, augmentation, image_size, seed, samples)
    except Exception as exc:
        if is_transient(exc):
            # The pending marker stays: the API sends the task again once it is stale.
            log.warning("preview %s: transient failure (%s); left to a later request", key, exc)
            return "retry"
        log.exception("preview %s failed", key)
        error = {"message": f"{type(exc).__name__}: {exc}", "at": time.time()}
        store.put_bytes(f"{key}.error.json", json.dumps(error).encode())
        store.delete_prefix(f"{key}.pending")
        return "failed"
    store.put_bytes(f"{key}.png", png)
    store.delete_prefix(f"{key}.pending")
    log.info("preview %s rendered (%d bytes)", key, len(png))
    return "rendered"

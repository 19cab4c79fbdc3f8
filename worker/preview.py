"""Render a PNG grid of augmented training samples, exactly as a job would see them.

Run as a short-lived process by the API (which never imports torch itself):
    python -m worker.preview DATASET_ID OUT.png '{"preset": "standard", "hflip": true}' \
        --image-size 224 --seed 0 --samples 8
"""

from __future__ import annotations

import argparse
import json
import zipfile

import numpy as np
import torch
from PIL import Image, ImageDraw

from core.db import session_scope
from core.jobspec import Augmentation, JobSpec
from core.models import Dataset
from core.settings import get_settings
from core.storage import get_store
from worker.datasets import fetch_dataset
from worker.training.augment import batch_mixing, train_transform
from worker.training.data import resize_center_crop

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


def render(dataset_id: str, augmentation: dict, image_size: int, seed: int, samples: int) -> bytes:
    settings = get_settings()
    store = get_store(settings)
    with session_scope(settings) as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None:
            raise SystemExit(f"dataset {dataset_id} not found")
        archive_key, index_key, classes = ds.archive_key, ds.index_key, list(ds.classes)
    cache, index = fetch_dataset(settings, store, dataset_id, archive_key, index_key)
    config = JobSpec(
        image_size=image_size, seed=seed, augmentation=Augmentation(**augmentation)
    )
    transform = train_transform(config)
    mixing = batch_mixing(config, len(classes))
    torch.manual_seed(seed)
    chosen = pick_samples(index["entries"], samples, seed)
    rows = []
    with zipfile.ZipFile(cache) as zf:
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
    from io import BytesIO

    buf = BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset_id")
    p.add_argument("out")
    p.add_argument("augmentation", help="JSON of the job's `augmentation` field")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8)
    args = p.parse_args()
    png = render(
        args.dataset_id, json.loads(args.augmentation), args.image_size, args.seed, args.samples
    )
    with open(args.out, "wb") as f:
        f.write(png)


if __name__ == "__main__":
    main()

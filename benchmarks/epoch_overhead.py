"""Epoch time through the worker vs a bare PyTorch loop: same model, data and batch size.

The worker's figure is what it records itself (job_metrics.epoch_seconds) for a real job
run by `worker.tasks.run_job` on the embedded default (SQLite, local store), with its
progress writes, heartbeats and metrics. The bare loop is the textbook loop over the same
cached, augmented digits. The two alternate, so machine noise hits both alike.

    .venv/bin/python benchmarks/epoch_overhead.py [--rounds 3] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def bare_epochs(
    archive: Path, index: dict, epochs: int, batch_size: int, image_size: int
) -> list[float]:
    import torch
    from torch.utils.data import DataLoader

    from core.jobspec import Augmentation, JobSpec
    from worker.training.backbones import create_model
    from worker.training.data import prepare

    config = JobSpec(
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        augmentation=Augmentation(hflip=False),
    )
    data = prepare(archive, index, config, archive.parent / "bare-cache")
    torch.manual_seed(0)
    model = create_model(config.backbone, len(data.classes))
    loader = DataLoader(data.train_set(config), batch_size=batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times


def worker_epochs(
    data_dir: Path, zip_bytes: bytes, epochs: int, batch_size: int, image_size: int
) -> tuple[list[float], float]:
    os.environ["DATA_DIR"] = str(data_dir)
    os.environ["AUTH_ENABLED"] = "false"  # the benchmark's own throwaway embedded service
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from core.db import migrate, session_scope
    from core.models import JobMetric
    from core.settings import get_settings
    from service.main import create_app
    from worker.tasks import run_job

    get_settings.cache_clear()
    migrate()
    with TestClient(create_app()) as api:
        ds = api.post(
            "/v1/datasets", files={"file": ("d.zip", zip_bytes, "application/zip")}
        ).json()
        job = api.post(
            "/v1/jobs",
            json={
                "dataset_id": ds["id"],
                "epochs": epochs,
                "image_size": image_size,
                "strategy": "full",  # like for like with the bare loop
                "batch_size": batch_size,
                "augmentation": {"hflip": False},
            },
        ).json()
    start = time.perf_counter()
    assert run_job(job["id"]) == "succeeded"
    wall = time.perf_counter() - start
    with session_scope() as s:
        rows = s.scalars(
            select(JobMetric).where(JobMetric.job_id == job["id"]).order_by(JobMetric.epoch)
        ).all()
        return [r.epoch_seconds for r in rows], wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=None, help="train on the first N digits")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: does it run")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.epochs, args.image_size, args.images = 1, 2, 32, 160

    from cli.demo import digits_split, imagefolder_zip
    from service.ingest import Limits, ingest_archive

    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    train, _ = digits_split()
    train = train[: args.images] if args.images else train
    archive = imagefolder_zip(train, tmp / "digits.zip")
    zip_bytes = archive.read_bytes()
    with open(archive, "rb") as f:
        index = ingest_archive(f, tmp / "images.zip", Limits()).index()
    archive = tmp / "images.zip"

    bare: list[float] = []
    worker: list[float] = []
    walls: list[float] = []
    for r in range(args.rounds):
        # Skip each run's first epoch: it pays for allocator and kernel warm-up.
        bare += bare_epochs(archive, index, args.epochs, args.batch_size, args.image_size)[1:]
        w, wall = worker_epochs(
            tmp / f"var{r}", zip_bytes, args.epochs, args.batch_size, args.image_size
        )
        worker += w[1:]
        walls.append(wall)
        print(
            f"round {r + 1}: bare {bare[-1]:.2f}s/epoch, worker {worker[-1]:.2f}s/epoch", flush=True
        )
    b, w = statistics.median(bare), statistics.median(worker)
    print(
        f"\nefficientnet_lite0, digits {len(train)} images (80% train), {args.image_size}px, "
        f"batch {args.batch_size}, torch threads {__import__('torch').get_num_threads()}"
    )
    print(f"bare loop epoch (median of {len(bare)}): {b:.2f}s")
    print(f"worker epoch    (median of {len(worker)}): {w:.2f}s")
    print(f"ratio worker/bare: {w / b:.3f}")
    print(f"worker job wall time incl. prepare+export (median): {statistics.median(walls):.1f}s")


if __name__ == "__main__":
    main()

"""What an epoch costs per strategy: `linear_probe` (a pass over cached features, after a
one-time feature extraction) vs `full` (a pass through the whole network), same data.

    .venv/bin/python benchmarks/strategy_cost.py [--epochs 3] [--image-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.demo import digits_split, imagefolder_zip  # noqa: E402
from core.jobspec import Augmentation, JobSpec  # noqa: E402
from service.ingest import Limits, ingest_archive  # noqa: E402
from worker.training.data import prepare  # noqa: E402
from worker.training.fit import fit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: does it run")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cost-"))
    train, _ = digits_split()
    if args.smoke:
        args.epochs, args.image_size, train = 1, 32, train[:160]
    archive = imagefolder_zip(train, tmp / "digits.zip")
    with open(archive, "rb") as f:
        index = ingest_archive(f, tmp / "images.zip", Limits()).index()
    archive = tmp / "images.zip"
    rows = {}
    for strategy in ("linear_probe", "full"):
        cfg = JobSpec(
            strategy=strategy,
            epochs=args.epochs,
            image_size=args.image_size,
            augmentation=Augmentation(hflip=False),
        )
        result = fit(cfg, prepare(archive, index, cfg, tmp / "cache"), num_workers=0)
        epoch = statistics.median(h["epoch_seconds"] for h in result.history)
        rows[strategy] = (epoch, result.extra.get("probe", {}).get("feature_seconds"))
    probe, full = rows["linear_probe"], rows["full"]
    print(f"digits {len(train)} images ({args.image_size}px, 80% train), efficientnet_lite0")
    print(f"full fine-tune epoch (median):   {full[0]:.3f}s")
    print(
        f"linear_probe head epoch (median): {probe[0]:.4f}s  (+ {probe[1]:.2f}s once for features)"
    )
    print(f"ratio probe epoch / full epoch:   {probe[0] / full[0]:.4f}")


if __name__ == "__main__":
    main()

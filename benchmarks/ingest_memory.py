"""Ingest a large archive with bounded memory: at least 1 GB and 20,000 images.

Builds an ImageFolder zip of random-noise PNGs (incompressible, so the archive really is
that big), then runs the real ingest (`service.ingest.ingest_archive`: full decode, hashes,
canonical zip) in a fresh process and reports peak RSS growth over the process's baseline
(after imports) and throughput.

    .venv/bin/python benchmarks/ingest_memory.py [--images 20000] [--size 132]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(path: Path, images: int, size: int, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(images):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            with zf.open(f"data/class_{i % classes:02d}/{i:06d}.png", "w") as f:
                Image.fromarray(arr).save(f, format="PNG", compress_level=1)


def measure(archive: Path) -> dict:
    """Runs in the child process."""
    from service.ingest import Limits, ingest_archive

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = archive.parent / "images.zip"
    start = time.perf_counter()
    with open(archive, "rb") as f:
        report = ingest_archive(f, out, Limits())
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = archive.stat().st_size
    return {
        "archive_mb": round(size / 1e6, 1),
        "images": len(report.entries),
        "seconds": round(seconds, 1),
        "mb_per_s": round(size / 1e6 / seconds, 1),
        "images_per_s": round(len(report.entries) / seconds, 1),
        "baseline_rss_mb": round(baseline_kb / 1024, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "rss_growth_mb": round((peak_kb - baseline_kb) / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--size", type=int, default=132)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="200 small images: does it run")
    args = p.parse_args()
    if args.smoke:
        args.images, args.size = 200, 32
    if args.child:
        # Import everything ingest needs before the baseline is read.
        import service.ingest  # noqa: F401

        print(json.dumps(measure(Path(args.child))))
        return
    tmp = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    archive = tmp / "big.zip"
    t = time.perf_counter()
    build(archive, args.images, args.size)
    gb, took = archive.stat().st_size / 1e9, time.perf_counter() - t
    print(f"built {gb:.2f} GB, {args.images} images in {took:.0f}s")
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(archive)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for k, v in result.items():
        print(f"{k:18s} {v}")
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

"""LP-FT's first fine-tuning epoch against the probe it starts from (issue 12).

Per proxy (`benchmarks/proxies.py`, uploaded as `train/` and `test/` folders and ingested as
the API does) and variant: `lp_ft` with one fine-tuning epoch at a fixed input size, the
auto recipe's other choices (crops keeping 60% of the area, no flips, warm-up over half the
run), the variant's fields over them; printed: the probe's validation accuracy, each
fine-tuning epoch's (and its training loss), and the test accuracy of the model kept.

    .venv/bin/python benchmarks/lp_ft_first_epoch.py --proxy digits --size 32 \\
        --variants '[{}, {"learning_rate": 1e-3}]' [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.proxies import PROXIES, build  # noqa: E402

LR = 1e-4  # worker.training.recipe.LP_FT_LEARNING_RATE (not imported: torch loads late)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--proxy", choices=[n for n in PROXIES if n != "digits-pairs"])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--variants", default="[{}]", help="JSON list of JobSpec fields")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="digits at 32 px, 20 a class, one variant")
    args = p.parse_args()
    if args.smoke:
        args.proxy, args.size, args.variants = args.proxy or "digits", 32, "[{}]"
    if args.proxy is None:
        p.error("--proxy is required (or --smoke)")
    import torch

    from core.jobspec import JobSpec
    from service.ingest import Limits, ingest_archive
    from worker.training.data import prepare
    from worker.training.fit import fit

    torch.set_num_threads(args.threads)
    proxy = build(args.proxy, args.seed, per_class=20 if args.smoke else None)
    work = Path(tempfile.mkdtemp(prefix="lpft-"))
    try:
        upload = proxy.write_splits_zip(work / "upload.zip")
        with open(upload, "rb") as f:
            index = ingest_archive(f, work / "images.zip", Limits()).index()
        for variant in json.loads(args.variants):
            fields = {
                "recipe": "manual",
                "strategy": "lp_ft",
                "image_size": args.size,
                "epochs": 1,
                "seed": args.seed,
                "learning_rate": LR,
                "warmup_epochs": 0.5,
                "augmentation": {
                    "ops": [{"name": "random_resized_crop", "scale_min": 0.6}],
                    "hflip": False,
                },
                **variant,
            }
            spec = JobSpec(**fields)
            data = prepare(work / "images.zip", index, spec, work / f"cache{args.size}")
            t0 = time.monotonic()
            result = fit(spec, data)
            probe = next(h for h in result.history if h["phase"] == "probe")
            ft = [h for h in result.history if h["phase"] == "fine_tune"]
            drop = probe["val_accuracy"] - ft[0]["val_accuracy"] if ft else 0.0
            print(
                f"{args.proxy} {args.size}px {json.dumps(variant)}: probe val "
                f"{probe['val_accuracy']:.4f}; fine-tuning (val, train loss) "
                f"{[(round(h['val_accuracy'], 4), round(h['train_loss'], 3)) for h in ft]}; "
                f"test {result.report['test']['top1_accuracy']:.4f}; "
                f"{time.monotonic() - t0:.0f} s; first epoch vs probe {-drop:+.4f} "
                f"({'within' if drop <= 0.01 else 'MISSES'} the 1-point target)",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

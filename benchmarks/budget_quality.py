"""Quality at a fixed CPU time budget: the default recipe vs plain linear probing and plain
full fine-tuning, each given the same wall-clock budget for `fit` (model build, feature
extraction, training and evaluation included).

Datasets built from packaged data: scikit-learn's digits (1797 8x8 images, 10 classes) and
scikit-image's lfw_subset (200 25x25 images, face / not face). Each keeps a stratified test
split the training never sees; accuracy is reported on it.

    .venv/bin/python benchmarks/budget_quality.py [--seeds 0 1] \
        [--digits-budget 45] [--lfw-budget 20]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.jobspec import Augmentation, JobSpec  # noqa: E402
from service.ingest import Limits, ingest_archive  # noqa: E402
from worker.training.data import prepare, stratified_split  # noqa: E402
from worker.training.fit import fit  # noqa: E402

RECIPES = {
    "linear_probe (plain)": dict(strategy="linear_probe", epochs=300, learning_rate=1e-3),
    "full fine-tune (plain)": dict(strategy="full", epochs=30, learning_rate=1e-3),
    "default recipe (lp_ft)": dict(epochs=30, learning_rate=1e-3),
}


def dataset(name: str) -> tuple[list[np.ndarray], list[int]]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return [(im * 255 / 16).round().astype(np.uint8) for im in d.images], d.target.tolist()
    from skimage.data import lfw_subset

    faces = lfw_subset()  # 100 faces then 100 non-faces, float in [0, 1]
    return [(im * 255).round().astype(np.uint8) for im in faces], [0] * 100 + [1] * 100


def run(name: str, budget: float, seed: int, image_size: int, hflip: bool) -> dict[str, float]:
    images, labels = dataset(name)
    tmp = Path(tempfile.mkdtemp(prefix=f"bq-{name}-"))
    archive = tmp / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            zf.writestr(f"{y}/{i:05d}.png", buf.getvalue())
    with open(archive, "rb") as f:
        index = ingest_archive(f, tmp / "images.zip", Limits()).index()
    archive = tmp / "images.zip"
    entry_labels = [e["label"] for e in index["entries"]]
    rest, test = stratified_split(entry_labels, 0.25, seed=1000 + seed)
    out = {}
    for recipe, kw in RECIPES.items():
        cfg = JobSpec(
            image_size=image_size,
            batch_size=32,
            seed=seed,
            time_budget_seconds=budget,
            augmentation=Augmentation(hflip=hflip),
            **kw,  # type: ignore[arg-type]
        )
        data = prepare(archive, index, cfg, tmp / "cache")
        # Validation comes out of the non-test part only.
        sub_train, sub_val = stratified_split([entry_labels[i] for i in rest], 0.2, seed)
        data.train_idx, data.val_idx, data.test_idx = rest[sub_train], rest[sub_val], test
        result = fit(cfg, data, num_workers=0)
        out[recipe] = result.report["test"]["top1_accuracy"]
        print(
            f"  {name} seed {seed} {recipe}: test acc {out[recipe]:.4f} "
            f"({len(result.history)} epochs, stopped: {result.stopped_reason})",
            flush=True,
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--digits-budget", type=float, default=45)
    p.add_argument("--lfw-budget", type=float, default=20)
    p.add_argument("--smoke", action="store_true", help="one seed, 5 s budgets, 32 px: does it run")
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.digits_budget, args.lfw_budget = [0], 5.0, 5.0
    table: dict[str, dict[str, list[float]]] = {}
    for name, budget, size, hflip in (
        ("digits", args.digits_budget, 64, False),
        ("lfw_subset", args.lfw_budget, 64, True),
    ):
        size = 32 if args.smoke else size
        for seed in args.seeds:
            for recipe, acc in run(name, budget, seed, size, hflip).items():
                table.setdefault(name, {}).setdefault(recipe, []).append(acc)
    print("\n| dataset (budget) | recipe | test accuracy, mean over seeds | per seed |")
    print("|---|---|---|---|")
    for name, rows in table.items():
        budget = args.digits_budget if name == "digits" else args.lfw_budget
        for recipe, accs in rows.items():
            print(
                f"| {name} ({budget:.0f} s) | {recipe} | {statistics.mean(accs):.4f} | "
                f"{', '.join(f'{a:.4f}' for a in accs)} |"
            )


if __name__ == "__main__":
    main()

"""The auto recipe: measure the data and this device, then choose how to train.

Run by the worker before the image cache is built (`plan`), inside the job's time budget:

1. **Profile** the dataset from its index: images per split, classes, imbalance, native
   image sizes; a stratified subsample of the training images is decoded once.
2. **Score candidates** (backbone x input size): pooled features of the subsample through
   each pretrained backbone at each size, timed (this device's images/s), and a
   cross-validated logistic regression on them (`linear.fit_linear`, the probe's own
   solver). A size is worth its cost only when it scores measurably better than a cheaper
   one: the cheapest candidate within `TOLERANCE` of the best wins.
3. **Flips**: a cross-validated probe fitted with and without mirrored copies of its
   training images; when the copies cost accuracy (digits, text) flips stay out of
   augmentation.
4. **Time**: one training step is timed at the chosen size; with the measured speeds the
   plan fits the phases into the budget (the user's, or a default from the dataset size
   and this speed): the probe's feature pass always, then as many fine-tuning epochs as fit
   after a reserve for the final evaluation and export. No room for one epoch: the job is
   a linear probe.

Every field the user set (`pinned`) is kept as set; a user who sets `epochs` and no
budget gets no default budget (their epochs run). The choices and every candidate's
score go into `Plan.record`, stored with the job's config and report.
"""

from __future__ import annotations

import logging
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from core.backbones import BACKBONES
from core.jobspec import JobSpec
from worker.training.backbones import create_model
from worker.training.data import resize_center_crop
from worker.training.linear import fit_linear
from worker.training.weights import WeightsSource

log = logging.getLogger(__name__)

SIZES = (96, 128, 160, 224)  # candidate input sizes (px), cheapest first
TOLERANCE = 0.015  # a costlier candidate must score this much more (cross-validated)
FLIP_TOLERANCE = 0.01  # flips stay on unless mirrored copies cost more accuracy than this
SUBSAMPLE = 320  # images decoded and scored per candidate (fewer for tiny budgets)
EPOCHS_CAP = 30  # fine-tuning epochs the plan never exceeds
PASS_SHARE = 0.3  # one feature pass over every image may take this share of the budget
SCORING_PENALTIES = (1e-3, 1e-2, 1e-1)  # the candidates' probes (the job's probe: more)
EXPORT_SECONDS = 5.0  # writing and uploading the model files (measured: 2-4 s for lite0)
# Default budget when the user sets none: this many fine-tuning epochs at the measured
# speed, within [MIN, cap(n)] where cap grows with the dataset (1,000 images: 150 s).
DEFAULT_EPOCHS = {"cpu": 6, "cuda": 15}
MIN_DEFAULT_BUDGET = 60.0


def default_budget_cap(n_images: int, device: str) -> float:
    """The longest default budget for a dataset of `n_images` (seconds)."""
    per_image = 0.1 if device == "cpu" else 0.02
    return max(MIN_DEFAULT_BUDGET, min(3600.0, 50.0 + per_image * n_images))


@dataclass
class Candidate:
    backbone: str
    size: int
    cv_accuracy: float
    images_per_second: float  # inference, measured on this device

    def record(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "image_size": self.size,
            "cv_accuracy": round(self.cv_accuracy, 4),
            "images_per_second": round(self.images_per_second, 1),
        }


@dataclass
class Plan:
    spec: JobSpec  # what runs: the user's fields plus the recipe's choices
    record: dict[str, Any] = field(default_factory=dict)


def available_backbones(weights: WeightsSource | None) -> list[str]:
    """Backbones with weights on this host (or downloads allowed), cheapest first."""
    from core.backbones import locate_weights

    src = weights or WeightsSource()
    found = []
    for name, spec in BACKBONES.items():
        if src.allow_download:
            found.append(name)
            continue
        hub = src.torch_hub_dir or Path(torch.hub.get_dir())
        if src.hf_cache is None:
            from huggingface_hub import constants

            hf = Path(constants.HF_HUB_CACHE)
        else:
            hf = src.hf_cache
        if locate_weights(spec, src.weights_dir, hub, hf) is not None:
            found.append(name)
    return sorted(found, key=lambda n: BACKBONES[n].params_m)


def _subsample(labels: np.ndarray, pool: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Up to `k` indices of `pool`, every class represented (round robin over classes)."""
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(pool[labels[pool] == c])) for c in np.unique(labels[pool])]
    out: list[int] = []
    while len(out) < k and any(queues):
        for q in queues:
            if q and len(out) < k:
                out.append(int(q.pop()))
    return np.sort(np.asarray(out, dtype=np.int64))


def _decode(archive: Path, paths: list[str], longest: int) -> list[Image.Image]:
    """The images, RGB, shrunk (never enlarged) so their shorter side is at most `longest`."""
    out = []
    with zipfile.ZipFile(archive) as zf:
        for name in paths:
            with zf.open(name) as f, Image.open(f) as img:
                img = img.convert("RGB")
                w, h = img.size
                if min(w, h) > longest:
                    s = longest / min(w, h)
                    img = img.resize((max(1, round(w * s)), max(1, round(h * s))))
                out.append(img.copy())
    return out


def _tensor(
    images: list[Image.Image], backbone: str, size: int, flip: bool = False
) -> torch.Tensor:
    """The images as the job's eval transform makes them: resize, center crop, normalize."""
    bb = BACKBONES[backbone]
    resize = int(round(size / bb.crop_pct))
    arrays = []
    for img in images:
        a = resize_center_crop(img, resize, bb.interpolation)
        off = (resize - size) // 2
        a = a[off : off + size, off : off + size]
        arrays.append(a[:, ::-1] if flip else a)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(bb.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _features(
    model: nn.Module, x: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Pooled features and the images/s it took (after a one-batch warm-up)."""
    model.eval()
    batch = 64
    model(x[:8].to(device))  # warm-up: first-call allocation and kernel selection
    t0 = time.perf_counter()
    out = [model(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = max(time.perf_counter() - t0, 1e-6)
    return torch.cat(out), len(x) / seconds


def _train_rate(model: nn.Module, x: torch.Tensor, n_classes: int, device: torch.device) -> float:
    """Training images/s at this input size: two timed steps after a warm-up step."""
    head = nn.Linear(model.num_features, n_classes).to(device)  # type: ignore[arg-type]
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-6)
    model.train()
    batch = x[:16].to(device)
    rates = []
    for i in range(3):
        t0 = time.perf_counter()
        loss = head(model(batch)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            rates.append(len(batch) / (time.perf_counter() - t0))
    model.eval()
    return float(np.median(rates))


def _flip_check(feats: torch.Tensor, mirrored: torch.Tensor, y: torch.Tensor, n: int) -> dict:
    """Do mirrored copies help or hurt? Cross-validated accuracy of the probe fitted on the
    training folds as they are, and on the folds plus their mirror images (what flip
    augmentation trains on), both scored on the held-out fold as it is. ImageNet features
    are nearly mirror-invariant, so this asks the labels, not the features: a mirrored "2"
    labelled 2 is noise for digits and a free extra picture for faces."""
    from sklearn.model_selection import StratifiedKFold

    labels = y.numpy()
    k = int(min(3, np.bincount(labels)[np.bincount(labels) > 0].min()))
    if k < 2:
        return {"accuracy": None, "with_mirrored_accuracy": None}
    plain = augmented = 0
    loss = nn.CrossEntropyLoss()
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=0).split(labels, labels):
        a = fit_linear(feats[tr], y[tr], n, loss, penalties=(1e-2,))
        both = torch.cat([feats[tr], mirrored[tr]])
        b = fit_linear(both, torch.cat([y[tr], y[tr]]), n, loss, penalties=(1e-2,))
        plain += int((a.logits(feats[te]).argmax(1) == y[te]).sum())
        augmented += int((b.logits(feats[te]).argmax(1) == y[te]).sum())
    return {
        "accuracy": round(plain / len(y), 4),
        "with_mirrored_accuracy": round(augmented / len(y), 4),
    }


def plan(
    spec: JobSpec,
    pinned: list[str] | None,
    archive: Path,
    index: dict[str, Any],
    *,
    device: torch.device,
    weights: WeightsSource | None = None,
    deadline: float | None = None,
    spent: float = 0.0,
    on_phase: Callable[[str], None] | None = None,
) -> Plan:
    """The spec to run. `deadline` (time.monotonic) is when the user's budget ends, None
    when they set none; `spent`: seconds of the job already gone (download, earlier
    attempts), counted against a default budget too."""
    t0 = time.monotonic()
    keep = set(pinned or [])
    entries = index["entries"]
    labels = np.asarray([int(e["label"]) for e in entries])
    splits = np.asarray([e.get("split") or "train" for e in entries])
    pool = np.flatnonzero(splits == "train")
    n_classes = len(index["classes"])
    n_val_given = int((splits == "val").sum())
    n_train = len(pool) if n_val_given else int(round(len(pool) * (1 - spec.val_fraction)))
    n_eval = len(entries) - n_train  # validation and test images: evaluated at the end
    counts = np.bincount(labels[pool], minlength=n_classes)
    sides = np.asarray([min(e.get("w") or 0, e.get("h") or 0) for e in entries], dtype=float)
    native = float(np.median(sides[sides > 0])) if (sides > 0).any() else 224.0
    budget_left = None if deadline is None else deadline - time.monotonic()
    k = SUBSAMPLE if budget_left is None or budget_left >= 90 else max(n_classes * 4, 160)
    sub = _subsample(labels, pool, k, spec.seed)
    y = torch.as_tensor(labels[sub])
    record: dict[str, Any] = {
        "dataset": {
            "train_images": n_train,
            "eval_images": n_eval,
            "classes": n_classes,
            "imbalance": round(float(counts.max() / max(counts[counts > 0].min(), 1)), 2),
            "native_size": round(native),
            "subsample": len(sub),
        },
        "device": device.type,
        "pinned": sorted(keep),
    }
    if on_phase:
        on_phase("planning")
    images = _decode(archive, [entries[i]["path"] for i in sub], max(SIZES) * 2)
    gray = all(
        np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
        for a in (np.asarray(im) for im in images[:32])
    )
    record["dataset"]["grayscale"] = gray

    backbones = [spec.backbone] if "backbone" in keep else available_backbones(weights)[:1]
    if "backbone" not in keep and device.type == "cuda":
        backbones = available_backbones(weights)[:3]
    if not backbones:
        backbones = [spec.backbone]
    sizes = [spec.input_size] if "image_size" in keep else list(SIZES)
    candidates: list[Candidate] = []
    models: dict[str, nn.Module] = {}
    skipped: list[dict[str, Any]] = []
    # What one pass over every image may cost, at most: a share of the budget (of the
    # default budget's cap when the user set none). Larger sizes are not even measured
    # when the speed of a smaller one says they cannot fit.
    horizon = (
        budget_left if budget_left is not None else default_budget_cap(len(entries), device.type)
    )
    max_pass = PASS_SHARE * max(horizon - (time.monotonic() - t0), 1.0)
    for name in backbones:
        model = create_model(name, 0, True, weights).to(device)
        models[name] = model
        last: Candidate | None = None
        for size in sizes:
            if last is not None:
                guess = last.images_per_second * (last.size / size) ** 2
                if len(entries) / guess > max_pass:
                    skipped.append(
                        {
                            "backbone": name,
                            "image_size": size,
                            "estimated_pass_seconds": round(len(entries) / guess, 1),
                        }
                    )
                    continue
            x = _tensor(images, name, size)
            feats, rate = _features(model, x, device)
            solved = fit_linear(
                feats,
                y,
                n_classes,
                nn.CrossEntropyLoss(),
                seed=spec.seed,
                penalties=SCORING_PENALTIES,
            )
            score = max(solved.cv_scores.values()) if solved.cv_scores else 0.0
            last = Candidate(name, size, score, rate)
            candidates.append(last)
    best_score = max(c.cv_accuracy for c in candidates)
    # Cost per image: inverse speed. The cheapest within the tolerance of the best.
    good = [c for c in candidates if c.cv_accuracy >= best_score - TOLERANCE]
    chosen = min(good, key=lambda c: 1.0 / c.images_per_second)
    record["candidates"] = [c.record() for c in candidates]
    record["not_measured"] = skipped  # too slow for the budget by a smaller size's speed
    record["chosen"] = {"backbone": chosen.backbone, "image_size": chosen.size}

    model = models[chosen.backbone]
    x = _tensor(images, chosen.backbone, chosen.size)
    feats, _ = _features(model, x, device)
    mirrored, _ = _features(model, _tensor(images, chosen.backbone, chosen.size, True), device)
    flips = _flip_check(feats, mirrored, y, n_classes)
    flip_ok = flips["accuracy"] is None or (
        flips["with_mirrored_accuracy"] >= flips["accuracy"] - FLIP_TOLERANCE
    )
    record["flip_check"] = {**flips, "hflip": flip_ok}
    train_rate = _train_rate(model, x, n_classes, device)
    del models, model
    fwd = chosen.images_per_second

    planning = time.monotonic() - t0
    # Seconds of each phase at the measured speeds (decoding the cache ~ a feature pass).
    extract = (n_train + n_eval) / fwd  # the probe's features of train and validation
    cache = 0.3 * extract
    final_eval = n_eval / fwd
    epoch = n_train / train_rate + n_eval / fwd * 0.5  # train + validate (val ~ half of eval)
    fixed = cache + extract + 2.0 + final_eval + EXPORT_SECONDS
    budget: float | None
    if deadline is not None:
        budget = float(spec.time_budget_seconds or 0)
        room = deadline - time.monotonic() - fixed
    elif "epochs" in keep:
        # The user said how long (in epochs) and set no budget: no default budget cuts it.
        budget, room = None, math.inf
    else:
        cap = default_budget_cap(len(entries), device.type)
        wanted = spent + planning + fixed + DEFAULT_EPOCHS.get(device.type, 6) * epoch
        budget = float(math.ceil(min(cap, max(MIN_DEFAULT_BUDGET, wanted))))
        room = budget - spent - planning - fixed
    epochs = spec.epochs if math.isinf(room) else int(max(0.0, room) // epoch)
    record["speed"] = {
        "inference_images_per_second": round(fwd, 1),
        "train_images_per_second": round(train_rate, 1),
        "planning_seconds": round(planning, 1),
        "estimated_epoch_seconds": round(epoch, 1),
        "estimated_fixed_seconds": round(fixed, 1),
    }
    choices: dict[str, Any] = {
        "backbone": chosen.backbone,
        "image_size": chosen.size,
        "time_budget_seconds": budget,
    }
    strategy = spec.strategy if "strategy" in keep else ("lp_ft" if epochs >= 1 else "linear_probe")
    if strategy == "linear_probe":
        choices.update(strategy=strategy, epochs=1)
    else:
        choices.update(strategy=strategy, epochs=max(1, min(epochs, EPOCHS_CAP)))
        # Fine-tuning continues from the probe: a gentle start, the learning rate rising
        # from zero (quadratically) over up to two epochs, half the run at most.
        choices.update(warmup_epochs=min(2.0, choices["epochs"] / 2))
    choices["augmentation"] = {**spec.augmentation.model_dump(), "hflip": flip_ok}
    choices["batch_size"] = 64 if device.type == "cuda" else 32
    applied = {k: v for k, v in choices.items() if k not in keep}
    if "augmentation" in keep:
        applied.pop("augmentation", None)
    data = spec.model_dump(mode="json")
    # Backbone-dependent defaults follow the chosen backbone unless the user set them.
    for derived in ("mean", "std"):
        if derived not in keep:
            data.pop(derived, None)
    data.update(applied)
    resolved = type(spec).model_validate(data)
    record["choices"] = applied
    record["fitted_epochs"] = epochs
    log.info("auto recipe: %s (planning took %.1fs)", applied, planning)
    return Plan(resolved, record)

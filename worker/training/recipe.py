"""The auto recipe: measure the data and this device, then choose how to train.

Run by the worker before the image cache is built (`plan`), inside the job's time budget:

1. **Profile** the dataset from its index: images per split, classes, imbalance, native
   image sizes; a stratified subsample of the training images is decoded once.
2. **Score candidates** (backbone x input size): pooled features of the subsample through
   each pretrained backbone at each size, timed (this device's images/s), and a
   cross-validated logistic regression on them (`linear.fit_linear`, the probe's own
   solver). A size is worth its cost only when it scores measurably better than a cheaper
   one: the cheapest candidate that no other outscores by more than `candidates.margin`
   (1.5 points, or two standard errors of the image-by-image difference) wins (so once the
   choice scores within 1.5 points of 1.0, no larger size is measured; nor after two
   larger sizes in a row scored no better than a smaller one). A multi-label
   dataset is scored by its own metric: one-vs-rest (BCE) probes' cross-validated mAP.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.jobspec import JobSpec
from worker.training import measure
from worker.training import multilabel as multilabel_lib
from worker.training.backbones import create_model
from worker.training.candidates import Candidate, choice_record, choice_settled, choose
from worker.training.data import MULTI_LABEL
from worker.training.linear import fit_linear
from worker.training.refit import BACKOFF_MAX_EPOCHS, EPOCHS_CAP, delivery_seconds
from worker.training.weights import WeightsSource

log = logging.getLogger(__name__)

SIZES = (64, 96, 128, 160, 224)  # candidate input sizes (px), cheapest first
# 64 px is a candidate only for images no larger than that (native shorter side): there it
# loses no detail the images have, costs under half of 96 px a step, and fits twice the
# epochs (1,000 digits at 120 s: 9-10 epochs where 96 px fitted 6; +2.3 points on the
# test split, 3 of 3 seeds better; degraded digits +2.5). A photo keeps 96 px and up.
LOW_RES_SIZE = 64
# Why a candidate is in `not_measured`: planning's share of the budget was spent, a feature
# pass over every image would be too long for the budget, it cannot win
# (`candidates.choice_settled`), or the sizes below it stopped gaining (`NO_GAIN`).
PLANNING_TIME = "planning time"
PASS_TOO_LONG = "a feature pass over every image would take over its share of the budget"
CANNOT_WIN = "the choice so far scored within the tolerance of 1.0: no larger size can change it"
NO_GAIN = "two larger sizes in a row scored no better than the best smaller one"
# Larger sizes stop being measured after this many in a row scored no better than the best
# smaller one (`NO_GAIN`): a larger one must beat the choice by the margin to be chosen,
# and the scores do not climb back after falling twice (degraded digits at 120 s: 64 px
# .506, 96 px .491, 128 px .497, then 160 px .494 took 6.5 s of the 16 s of planning).
NO_GAIN_RUN = 2
FLIP_TOLERANCE = 0.01  # flips stay on unless mirrored copies cost more accuracy than this
SUBSAMPLE = 320  # images decoded and scored per candidate (fewer for tiny budgets)
AUTO_CROP_SCALE_MIN = 0.6  # random resized crops keep at least this share of the area
MULTI_LABEL_SHIFT = 1 / 16  # multi-label: shifts of at most this share of the side, no crop
MIN_PROBE_PER_CLASS = 20  # a budget-limited probe still learns from this many a class
PLAN_SHARE = 0.12  # no candidate is measured that would take planning past this share
PASS_SHARE = 0.3  # one feature pass over every image may take this share of the budget
SCORING_PENALTIES = (1e-3, 1e-2, 1e-1)  # the candidates' probes (the job's probe: more)
# Default budget when the user sets none: this many fine-tuning epochs at the measured
# speed, within [MIN, cap(n)] where cap grows with the dataset (1,000 images: 150 s).
DEFAULT_EPOCHS = {"cpu": 6, "cuda": 15}
MIN_DEFAULT_BUDGET = 60.0
# lp_ft's head learning rate (the backbone's: x backbone_lr_mult, 0.5). The fine-tuning
# after the probe starts from a fitted head: at JobSpec's 1e-3, AdamW's first steps (a
# full learning rate per weight) wrecked it, the first epoch falling 3 to 30 points below
# the probe (digits 8 px at 32 px: 0.913 -> 0.882; degraded digits: 0.521 -> 0.226; lfw:
# training loss 0.1 -> 6.3), and a lower backbone rate alone (x0.1) did not prevent it.
LP_FT_LEARNING_RATE = 1e-4
# A longer plan (more than `refit.BACKOFF_MAX_EPOCHS` epochs) climbs out of the first
# epochs' dip, and 1e-4 was too slow to: 8 lp_ft epochs on 240 degraded digits at 128 px
# (no backoff) scored 0.43 and 0.45 on the test split at 1e-4, 0.60 and 0.67 at 3e-4,
# 0.60 and 0.60 at 1e-3 (a deeper dip: validation fell from 0.54 to 0.30 and 0.24).
LP_FT_LONG_LEARNING_RATE = 3e-4


def lp_ft_learning_rate(epochs: int) -> float:
    """lp_ft's head learning rate for a plan of `epochs` fine-tuning epochs."""
    return LP_FT_LEARNING_RATE if epochs <= BACKOFF_MAX_EPOCHS else LP_FT_LONG_LEARNING_RATE


def candidate_sizes(native: float) -> list[int]:
    """The input sizes worth measuring for images whose shorter side is `native` px."""
    return [s for s in SIZES if s > LOW_RES_SIZE or native <= LOW_RES_SIZE]


def default_budget_cap(n_images: int, device: str) -> float:
    """The longest default budget for a dataset of `n_images` (seconds)."""
    per_image = 0.1 if device == "cpu" else 0.02
    return max(MIN_DEFAULT_BUDGET, min(3600.0, 50.0 + per_image * n_images))


def augmentation_crop(multilabel: bool, size: int) -> dict[str, Any]:
    """The crop the plan trains with. Single-label: crops that keep most of the picture (a
    fine-tune of a few epochs on small images loses more to 35%-of-the-area crops, the
    `light` preset, than it learns from them). Multi-label: a crop that can cut an object
    out changes the image's label set, so the training images are only shifted, by at
    most `MULTI_LABEL_SHIFT` of their side (zero fill), never cropped to a part."""
    if multilabel:
        return {"name": "random_crop", "padding": max(1, round(size * MULTI_LABEL_SHIFT))}
    return {"name": "random_resized_crop", "scale_min": AUTO_CROP_SCALE_MIN}


@dataclass
class Plan:
    spec: JobSpec  # what runs: the user's fields plus the recipe's choices
    record: dict[str, Any] = field(default_factory=dict)


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
    labels = np.asarray([int(e["label"]) for e in entries])  # multi-label: the first class
    multilabel = index.get("task") == MULTI_LABEL
    splits = np.asarray([e.get("split") or "train" for e in entries])
    pool = np.flatnonzero(splits == "train")
    n_classes = len(index["classes"])
    n_val_given = int((splits == "val").sum())
    n_train = len(pool) if n_val_given else int(round(len(pool) * (1 - spec.val_fraction)))
    n_eval = len(entries) - n_train  # validation and test images: evaluated at the end
    if multilabel:
        lists = [e.get("labels") or [e["label"]] for e in entries]
        targets = multilabel_lib.targets_matrix(lists, n_classes)
        counts = multilabel_lib.positive_counts(targets[pool])  # images carrying each class
    else:
        counts = np.bincount(labels[pool], minlength=n_classes)
    sides = np.asarray([min(e.get("w") or 0, e.get("h") or 0) for e in entries], dtype=float)
    native = float(np.median(sides[sides > 0])) if (sides > 0).any() else 224.0
    budget_left = None if deadline is None else deadline - time.monotonic()
    k = SUBSAMPLE if budget_left is None or budget_left >= 90 else max(n_classes * 4, 160)
    sub = measure.subsample(labels, pool, k, spec.seed)
    # What the candidates' probes learn and are scored on: the task's own targets and
    # metric (multi-label: multi-hot rows, BCE, cross-validated mAP).
    y = torch.as_tensor(targets[sub]) if multilabel else torch.as_tensor(labels[sub])
    scoring_loss: nn.Module = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
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
    if multilabel:
        record["scored_on"] = "mAP"
    if on_phase:
        on_phase("planning")
    images = measure.decode(archive, [entries[i]["path"] for i in sub], max(SIZES) * 2)
    gray = all(
        np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
        for a in (np.asarray(im) for im in images[:32])
    )
    record["dataset"]["grayscale"] = gray

    backbones = [spec.backbone] if "backbone" in keep else measure.available_backbones(weights)[:1]
    if "backbone" not in keep and device.type == "cuda":
        backbones = measure.available_backbones(weights)[:3]
    if not backbones:
        backbones = [spec.backbone]
    sizes = [spec.input_size] if "image_size" in keep else candidate_sizes(native)
    candidates: list[Candidate] = []
    models: dict[str, nn.Module] = {}
    skipped: list[dict[str, Any]] = []
    features: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    # What one pass over every image may cost, at most: a share of the budget (of the
    # default budget's cap when the user set none). Larger sizes are not even measured
    # when the speed of a smaller one says they cannot fit.
    horizon = (
        budget_left if budget_left is not None else default_budget_cap(len(entries), device.type)
    )
    max_pass = PASS_SHARE * max(horizon - (time.monotonic() - t0), 1.0)
    steps: dict[str, float] = {"profile_and_decode": time.monotonic() - t0}
    settled = False  # one backbone's choice that no larger size can change (`choice_settled`)
    for name in backbones:
        if candidates and time.monotonic() - t0 > PLAN_SHARE * horizon:  # not even loaded
            skipped += [{"backbone": name, "image_size": s, "reason": PLANNING_TIME} for s in sizes]
            continue
        started = time.monotonic()
        model = create_model(name, 0, True, weights).to(device)
        steps[f"load {name}"] = time.monotonic() - started
        models[name] = model
        last: Candidate | None = None
        top, misses = -1.0, 0  # this backbone's best score so far; sizes since it
        for size in sizes:
            if settled:
                skipped.append({"backbone": name, "image_size": size, "reason": CANNOT_WIN})
                continue
            if misses >= NO_GAIN_RUN:
                skipped.append({"backbone": name, "image_size": size, "reason": NO_GAIN})
                continue
            # Planning keeps to its share of the budget: a candidate is not started when its
            # cost would take planning past it. The cost is the last one's, its timed pass
            # scaled with the pixels (the probe's solve and the warm-up are not).
            cost = 0.0
            if last is not None:
                timed = len(images) / last.images_per_second
                cost = last.seconds + timed * ((size / last.size) ** 2 - 1)
            if candidates and time.monotonic() - t0 + cost > PLAN_SHARE * horizon:
                skipped.append({"backbone": name, "image_size": size, "reason": PLANNING_TIME})
                continue
            if last is not None:
                guess = last.images_per_second * (last.size / size) ** 2
                if len(entries) / guess > max_pass:
                    skipped.append(
                        {
                            "backbone": name,
                            "image_size": size,
                            "reason": PASS_TOO_LONG,
                            "estimated_pass_seconds": round(len(entries) / guess, 1),
                        }
                    )
                    continue
            started = time.monotonic()
            x = measure.tensor(images, name, size)
            feats, rate = measure.features(model, x, device, name)
            solved = fit_linear(
                feats,
                y,
                n_classes,
                scoring_loss,
                seed=spec.seed,
                penalties=SCORING_PENALTIES,
            )
            score, correct = 0.0, None
            if solved.cv_scores:
                key = max(solved.cv_scores, key=lambda k: solved.cv_scores[k])
                score, correct = solved.cv_scores[key], solved.cv_correct.get(key)
            last = Candidate(name, size, score, rate, time.monotonic() - started, correct)
            candidates.append(last)
            features[(name, size)] = (x, feats)
            top, misses = (score, 0) if score > top else (top, misses + 1)
            settled = len(backbones) == 1 and choice_settled(candidates)
    chosen = choose(candidates)
    record["candidates"] = choice_record(candidates, chosen)
    # Too slow for the budget by a smaller size's speed, past planning's share of it,
    # unable to win (`choice_settled`), or after smaller sizes stopped gaining (`NO_GAIN`).
    record["not_measured"] = skipped
    record["chosen"] = {"backbone": chosen.backbone, "image_size": chosen.size}

    started = time.monotonic()
    model = models[chosen.backbone]
    x, feats = features.pop((chosen.backbone, chosen.size))
    features.clear()
    mirrored, _ = measure.features(
        model, measure.tensor(images, chosen.backbone, chosen.size, True), device, chosen.backbone
    )
    flips = measure.flip_check(feats, mirrored, y, n_classes)
    metric = "map" if multilabel else "accuracy"
    flip_ok = flips[metric] is None or (
        flips[f"with_mirrored_{metric}"] >= flips[metric] - FLIP_TOLERANCE
    )
    record["flip_check"] = {**flips, "hflip": flip_ok}
    steps["flip_check"] = time.monotonic() - started
    started = time.monotonic()
    train_rate = measure.train_rate(model, x, n_classes, device, chosen.backbone)
    steps["train_rate"] = time.monotonic() - started
    del models, model
    fwd = chosen.images_per_second

    planning = time.monotonic() - t0
    # Seconds of each phase at the measured speeds.
    extract = (n_train + n_eval) / fwd  # the probe's features of train and validation
    cache = 0.1 * extract  # decoding into the cache (small images: far below a pass)
    final_eval = n_eval / fwd
    epoch = n_train / train_rate + n_eval / fwd * 0.5  # train + validate (val ~ half of eval)
    probe = 1.0 + 0.003 * n_train  # the probe's cross-validated solves (measured: 3.3 s at 1,150)
    n_val = n_val_given or len(pool) - n_train
    # Export and label issues after the final evaluation: the job's time too.
    n_labelled = len(pool) + n_val_given
    delivery = delivery_seconds(n_val, n_labelled, 1.0 / fwd)
    if "strategy" in keep and spec.strategy in ("full", "gradual"):
        delivery += n_labelled / fwd  # no probe features for the label issues: a pass
    fixed = cache + extract + probe + final_eval + delivery
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
    # Rounded, not floored: a timed step is a noisy estimate, and fine-tuning re-fits its
    # schedule after each epoch (an epoch that would overrun is cut at the deadline).
    epochs = spec.epochs if math.isinf(room) else int(max(0.0, room) / epoch + 0.5)
    max_train = None
    if deadline is not None and room < 0:
        # Not even one feature pass over every training image fits: the probe learns from
        # as many as the time allows (class-balanced), the cheapest complete model.
        affordable = n_train + room * fwd / 1.3  # the pass shrinks; the probe's fits too
        # Never fewer than 20 a class (200 at least): below that the probe is not worth
        # delivering, and a job that overruns its budget a little is the lesser harm.
        max_train = max(MIN_PROBE_PER_CLASS * n_classes, 200, int(affordable))
        if max_train >= n_train:
            max_train = None
    record["speed"] = {
        "inference_images_per_second": round(fwd, 1),
        "train_images_per_second": round(train_rate, 1),
        "planning_seconds": round(planning, 1),
        "estimated_epoch_seconds": round(epoch, 1),
        "estimated_fixed_seconds": round(fixed, 1),
        "estimated_delivery_seconds": round(delivery, 1),
        "planning_steps": {k: round(v, 2) for k, v in steps.items()},  # candidates: their own
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
        if strategy == "lp_ft":
            # For the epochs that will run: the user's when they set them.
            runs = spec.epochs if "epochs" in keep else choices["epochs"]
            choices.update(learning_rate=lp_ft_learning_rate(runs))
    crop = augmentation_crop(multilabel, choices["image_size"])
    choices["augmentation"] = {
        **spec.augmentation.model_dump(),
        "hflip": flip_ok,
        "ops": [crop, *([{"name": "hflip"}] if flip_ok else [])],
    }
    choices["batch_size"] = 64 if device.type == "cuda" else 32
    if max_train is not None:
        choices["max_train_images"] = max_train
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

"""Label issues, found after training by confident learning (cleanlab), and the validation
images the delivered model gets most wrong ("top losses").

Confident learning needs out-of-sample predicted probabilities for every labelled image
(the training and validation splits): a model that has seen an image's label cannot say
that label is wrong (it learnt it). So the images' features are split into K folds
(stratified; group-aware when the dataset has duplicate groups, so a copy never vouches
for itself) and each fold is scored by a linear probe (logistic regression, as
`linear.fit_linear` fits it) fitted on the other folds, the K probes solved as one problem
(`linear.out_of_fold_logits`). The features are the probe's cached ones when the job
probed (the pretrained backbone's, which never saw a label, and cost nothing more);
otherwise (a `full` or `gradual` job, or one resumed past its probe) the delivered model's
pooled features of the un-augmented images: one more pass, and features that were trained
on these labels, so a weaker judge of them. The probes see the features' signed square
roots (power normalisation: sign(x) * sqrt(|x|), which tames the few large activations of
pooled CNN features; measured on the proxies, it lifted the probes' held-out accuracy by 1
to 3 points and recall of planted label noise by 3 to 7, BENCHMARKS.md). cleanlab then
estimates each class's noise rates from those probabilities
(`cleanlab.filter.find_label_issues`, pruning by noise rate) and ranks the flagged images
by their label quality (`cleanlab.rank.get_label_quality_scores`, self-confidence: the
out-of-sample probability of the label given; low is suspect).

Images a job never computed features of (left out by `max_train_images`, or a test split)
are not checked: on a CPU another pass over them would cost more than the 10% of a job
this may take.

Pure: no database, no storage, no settings. `worker/lifecycle.py` stores what this returns.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import cleanlab  # at import, not in the job: a worker pays its import time once
import numpy as np
import torch
from cleanlab.filter import find_label_issues as cleanlab_find
from cleanlab.multilabel_classification.filter import find_label_issues as find_ml
from cleanlab.multilabel_classification.rank import get_label_quality_scores as score_ml
from cleanlab.rank import get_label_quality_scores
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from torch import nn

from core.jobspec import JobSpec
from worker.training.data import PreparedData
from worker.training.fit import FitResult
from worker.training.linear import out_of_fold_logits
from worker.training.loop import predict
from worker.training.runtime import Runtime
from worker.training.sheets import issues_sheet, losses_sheet

FOLDS = 5
# The probes' L2 penalty (per image, on standardised features), fixed: the middle of the
# job probe's grid (`linear.PENALTIES`), which `fit_linear` also takes when it cannot
# cross-validate. The job's own choice is made for accuracy, where the strongest penalty
# often ties, and it shrinks every probability towards the prior; choosing by held-out log
# loss cost four times as many fits for no better ranking (BENCHMARKS.md).
PENALTY = 1e-2
RANKED_BY = "self_confidence"  # cleanlab's ranking and quality score
FILTER_BY = "prune_by_noise_rate"
TOP_LOSSES = 100  # validation images listed in label_issues.json


def power_normalise(features: torch.Tensor) -> torch.Tensor:
    """sign(x) * sqrt(|x|), per element (a pooled feature map's few large activations
    otherwise dominate a linear probe's distances)."""
    features = features.float()
    return features.sign() * features.abs().sqrt()


class LabelIssuesSkipped(Exception):
    """Label issues cannot be computed for this job; the message says why."""


@dataclass
class LabelIssues:
    method: str
    features: str  # "probe" (cached, pretrained) or "model" (the delivered model's)
    transform: str  # what the probes see of the features
    folds: int
    penalty: float  # the probes' L2 penalty
    images: int  # images checked: training and validation
    issues: list[dict[str, Any]]  # most suspect first
    per_class: dict[str, int]  # flagged images per given class (non-zero only)
    top_losses: list[dict[str, Any]]  # validation images, highest loss first
    top_losses_held_out: bool  # False: the delivered probe was refitted on them
    seconds: float = 0.0
    issues_png: bytes | None = None
    top_losses_png: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What the job's result records (`training.label_issues`)."""
        return {
            "count": len(self.issues),
            "images": self.images,
            "per_class": self.per_class,
            "method": self.method,
            "features": self.features,
            "transform": self.transform,
            "folds": self.folds,
            "penalty": self.penalty,
            "seconds": round(self.seconds, 3),
        }

    def document(self) -> dict[str, Any]:
        """label_issues.json: the summary, every flagged image and the top losses."""
        return {
            **self.summary(),
            "issues": self.issues,
            "top_losses": self.top_losses,
            "top_losses_held_out": self.top_losses_held_out,
        }


def fold_splits(
    strata: np.ndarray, groups: np.ndarray | None, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K stratified folds (`folds`, fewer only when no class has that many images); with
    `groups` that repeat (duplicate groups), no group is split across folds. A class smaller
    than K is missing from some folds' training part: its images there are judged by probes
    that never saw the class (cleanlab's per-class thresholds then decide)."""
    counts = np.bincount(strata)
    present = counts[counts > 0]
    if len(present) < 2 or present.max() < 2:
        raise LabelIssuesSkipped(
            "confident learning needs two classes and a class with two training images or more"
        )
    k = int(min(folds, present.max()))
    x = np.zeros(len(strata))
    with warnings.catch_warnings():  # a class smaller than K: sklearn warns, the folds are fine
        warnings.simplefilter("ignore", UserWarning)
        if groups is not None and len(np.unique(groups)) < len(groups):
            n_groups = len(np.unique(groups))
            if n_groups < 2:
                raise LabelIssuesSkipped("every image is a copy of one image: nothing to compare")
            k = min(k, n_groups)
            splitter: Any = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
            return list(splitter.split(x, strata, groups))
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(x, strata))


def out_of_sample_probs(
    features: torch.Tensor,
    targets: torch.Tensor,
    n_classes: int,
    splits: list[tuple[np.ndarray, np.ndarray]],
    *,
    penalty: float = PENALTY,
    max_iter: int = 100,
) -> np.ndarray:
    """(images, classes) probabilities, each row from a probe that never saw that image:
    softmax of a multinomial logistic regression, or (float multi-hot `targets`) a sigmoid
    per class (BCE summed over the classes, averaged over the images: each class a logistic
    regression of its own weight, as the single-label loss is per image; the job's BCE
    averages over classes too, which would make the penalty C times stronger). The plain
    loss (no class weights, no smoothing): cleanlab wants probabilities, and smoothing
    would squeeze them. The K probes are fitted together (`linear.out_of_fold_logits`)."""
    logits = out_of_fold_logits(features, targets, n_classes, splits, penalty, max_iter=max_iter)
    probs = logits.sigmoid() if targets.ndim == 2 else logits.softmax(1)
    return probs.float().cpu().numpy()


def rank_issues(given: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the flagged images, most suspect first; every image's label quality).
    `given`: class indices, or a multi-hot matrix (multi-label, cleanlab's own variant)."""
    if given.ndim == 2:
        lists = [list(np.flatnonzero(row > 0.5)) for row in given]
        ranked = find_ml(
            lists, probs, return_indices_ranked_by=RANKED_BY, filter_by=FILTER_BY, n_jobs=1
        )
        return np.asarray(ranked, dtype=np.int64), score_ml(lists, probs, method=RANKED_BY)
    with warnings.catch_warnings():  # a class absent from training: cleanlab warns, ranks on
        warnings.simplefilter("ignore")
        ranked = cleanlab_find(
            given, probs, return_indices_ranked_by=RANKED_BY, filter_by=FILTER_BY, n_jobs=1
        )
        scores = get_label_quality_scores(given, probs, method=RANKED_BY)
    return np.asarray(ranked, dtype=np.int64), np.asarray(scores)


def top_losses(
    logits: torch.Tensor, targets: torch.Tensor, thresholds: list[float] | None = None
) -> list[tuple[int, float, list[int] | int, float]]:
    """(position, loss, predicted class or classes, probability), highest loss first. The
    probability is the model's for its prediction; for a multi-label image, the probability
    it gives the class it gets most wrong (the largest term of the image's BCE)."""
    logits = logits.float()
    if targets.ndim == 2:
        terms = nn.functional.binary_cross_entropy_with_logits(
            logits, targets.float(), reduction="none"
        )
        losses = terms.mean(1)
        probs = logits.sigmoid()
        cut = torch.tensor(thresholds or [0.5] * logits.shape[1])
        worst = terms.argmax(1)
        order = torch.argsort(losses, descending=True).tolist()
        return [
            (
                i,
                float(losses[i]),
                torch.nonzero(probs[i] >= cut).flatten().tolist(),
                float(probs[i, worst[i]]),
            )
            for i in order
        ]
    losses = nn.functional.cross_entropy(logits, targets.long(), reduction="none")
    p, predicted = logits.softmax(1).max(1)
    order = torch.argsort(losses, descending=True).tolist()
    return [(i, float(losses[i]), int(predicted[i]), float(p[i])) for i in order]


def _features(
    result: FitResult, data: PreparedData, config: JobSpec, device: torch.device
) -> tuple[torch.Tensor, str]:
    """(features of the training then the validation images, where they come from: "probe"
    or "model")."""
    cache = result.probe_cache
    if (
        cache is not None
        and len(cache[1]) == len(data.train_idx)
        and len(cache[3]) == len(data.val_idx)
    ):
        return torch.cat([cache[0], cache[2]]), "probe"
    runtime = Runtime.on(device, 0, config.backbone)
    model = result.model.to(device)
    try:
        parts = []
        for images in (data.eval_train_set(config), data.val_set(config)):
            loader = runtime.loader(images, config.batch_size * 2)
            parts.append(predict(model, loader, device, runtime.amp_dtype, features=True)[0])
    finally:
        result.model.to("cpu")
    return torch.cat([p for p in parts if len(p)]), "model"


def _names(classes: list[str], value: int | list[int]) -> str | list[str]:
    if isinstance(value, list):
        return [classes[c] for c in value]
    return classes[value]


def find_label_issues(
    result: FitResult,
    data: PreparedData,
    config: JobSpec,
    paths: list[str],
    groups: np.ndarray | None = None,
    device: torch.device | None = None,
    *,
    folds: int = FOLDS,
    penalty: float = PENALTY,
    sheets: bool = True,
    power: bool = True,
) -> LabelIssues:
    """The images whose label confident learning doubts, most suspect first, and the
    validation images the delivered model gets most wrong. Checked: the training and the
    validation images (every labelled image the job learnt from or chose by; not a test
    split). `paths` and `groups` (duplicate group ids) are per dataset entry, as `data`'s
    indices are. `power` False: the probes see the features as they are (for comparison)."""
    start = last = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        timings[name], last = round(now - last, 3), now

    device = device or torch.device("cpu")
    classes = data.classes
    pool = np.concatenate([data.train_idx, data.val_idx]).astype(np.int64)
    feats, source = _features(result, data, config, device)
    if power:
        feats = power_normalise(feats)
    lap("features")
    if data.multilabel:
        assert data.targets is not None
        given = data.targets[pool]
    else:
        given = np.asarray(data.labels, dtype=np.int64)[pool]
    strata = np.asarray(data.labels, dtype=np.int64)[pool]  # multi-label: first class
    splits = fold_splits(strata, None if groups is None else groups[pool], folds, config.seed)
    probs = out_of_sample_probs(
        feats.to(device),
        torch.as_tensor(given).to(device),
        len(classes),
        splits,
        penalty=penalty,
        max_iter=config.probe_epochs,
    )
    lap("probabilities")
    ranked, quality = rank_issues(given, probs)
    issues = []
    per_class: Counter[str] = Counter()
    for pos in ranked.tolist():
        if data.multilabel:
            given_value: Any = np.flatnonzero(given[pos] > 0.5).tolist()
            suggested: Any = np.flatnonzero(probs[pos] >= 0.5).tolist()
            per_class.update(classes[c] for c in given_value)
        else:
            given_value, suggested = int(given[pos]), int(probs[pos].argmax())
            per_class[classes[given_value]] += 1
        j = int(pool[pos])
        issues.append(
            {
                "index": j,
                "path": paths[j],
                "given_label": _names(classes, given_value),
                "suggested_label": _names(classes, suggested),
                "score": round(float(quality[pos]), 6),
            }
        )
    losses = _top_losses(result, data, paths)
    lap("cleanlab and top losses")
    found = LabelIssues(
        method=f"confident learning (cleanlab {cleanlab.__version__}: find_label_issues "
        f"{FILTER_BY}, ranked by {RANKED_BY}) on out-of-sample probabilities of a "
        f"{len(splits)}-fold linear probe",
        features=source,
        transform="signed square root" if power else "none",
        folds=len(splits),
        penalty=penalty,
        images=len(pool),
        issues=issues,
        per_class=dict(per_class.most_common()),
        top_losses=losses,
        top_losses_held_out=result.report.get("validation", {}).get("held_out", True),
        timings=timings,
    )
    if sheets:
        found.issues_png = issues_sheet(found.issues, found.images, data.cache)
        found.top_losses_png = losses_sheet(found.top_losses, data.cache, found.top_losses_held_out)
        lap("sheets")
    found.seconds = time.perf_counter() - start
    return found


def _top_losses(result: FitResult, data: PreparedData, paths: list[str]) -> list[dict[str, Any]]:
    """The validation images by the delivered model's loss, highest first (at most
    TOP_LOSSES), each marked `correct` or not: a model that gets every one right still has
    its least sure answers, worth a look, but they are not mistakes."""
    if result.val_logits is None or len(data.val_idx) == 0:
        return []
    logits, targets = result.val_logits
    thresholds = result.extra.get("thresholds")
    out = []
    for pos, loss, predicted, prob in top_losses(logits, targets, thresholds)[:TOP_LOSSES]:
        j = int(data.val_idx[pos])
        target = targets[pos]
        given = np.flatnonzero(target.numpy() > 0.5).tolist() if target.ndim else int(target)
        out.append(
            {
                "index": j,
                "path": paths[j],
                "given_label": _names(data.classes, given),
                "predicted_label": _names(data.classes, predicted),
                "correct": predicted == given,
                "probability": round(prob, 4),
                "loss": round(loss, 4),
            }
        )
    return out

"""A linear classifier on cached features: multinomial logistic regression solved by
L-BFGS (torch.optim.LBFGS, full batch), its L2 penalty chosen by stratified k-fold
cross-validation, the features standardised and the standardisation folded into the
returned weights, so the result drops into the network's own `nn.Linear` head.

It minimises the job's own loss (`loss_fn`: class weights, label smoothing), so the probed
head is fitted to the objective fine-tuning continues with; for a multi-label job that is
BCE (one logistic regression per class), its penalty chosen by cross-validated mAP. On
cached features a fit takes milliseconds to a second: this is the "cheap" phase that
always completes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from torch import nn

T = TypeVar("T")

# L2 penalties tried (per sample, on standardised features). sklearn's C is 1 / (lam * n).
PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class LinearFit:
    weight: torch.Tensor  # (classes, features), standardisation folded in
    bias: torch.Tensor  # (classes,)
    penalty: float
    cv_scores: dict[str, float] = field(default_factory=dict)  # penalty -> mean fold score
    folds: int = 0
    cv_metric: str = "accuracy"  # "map" for multi-label
    # penalty -> each image's held-out verdict (right or not) in the folds; single-label only
    cv_correct: dict[str, np.ndarray] = field(default_factory=dict)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias

    def load_into(self, head: nn.Module) -> None:
        assert isinstance(head, nn.Linear), f"the head is {type(head).__name__}, not Linear"
        with torch.no_grad():
            head.weight.copy_(self.weight.to(head.weight))
            head.bias.copy_(self.bias.to(head.bias))

    def summary(self) -> dict[str, Any]:
        return {
            "solver": "lbfgs",
            "penalty": self.penalty,
            "cv_folds": self.folds,
            f"cv_{self.cv_metric}": {k: round(v, 4) for k, v in self.cv_scores.items()},
        }


def _solve(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    penalty: float,
    loss_fn: nn.Module,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(n_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(x @ w.T + b, y) + 0.5 * penalty * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[arg-type]
    return w.detach(), b.detach()


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    # Near-constant features are not blown up: their folded weights (w / std) would be
    # huge, and the first fine-tuning steps, which move every feature, would swing the
    # logits (a 0.9 probe fell to 0.5 in one epoch on 8-px digits). A tenth of the typical
    # spread is the least any feature is divided by.
    std = std.clamp_min(max(1e-3, 0.1 * float(std.median())))
    return mean, std


def single_threaded(fn: Callable[..., T]) -> Callable[..., T]:
    """Run `fn` with one torch thread on the CPU. The solver's products are small: one
    thread does them as fast as several, and several collapse when the host is busy
    (spinning OpenMP workers on shared cores: 3 s became 22 s here beside one other
    process). Inputs on a GPU are left alone."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args: Any, **kwargs: Any) -> T:
        if x.device.type != "cpu":
            return fn(x, *args, **kwargs)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(x, *args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


@single_threaded
def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    loss_fn: nn.Module,
    *,
    seed: int = 0,
    max_iter: int = 100,
    penalties: tuple[float, ...] = PENALTIES,
    folds: int = 3,
) -> LinearFit:
    """Logistic regression of `y` (class indices) on `x` (N, D): the penalty with the best
    mean accuracy over stratified folds (ties: the stronger penalty), refitted on all.

    With float multi-hot `y` (N, classes), a multi-label fit: `loss_fn` is then BCE (one
    logistic regression per class, fitted together), the folds are stratified on each
    image's first class and scored by mean average precision (`fold_map`)."""
    x = x.float()
    mean, std = _standardise(x)
    z = (x - mean) / std
    multilabel = y.ndim == 2
    # The first class of each image (its labels are sorted): what the folds stratify on.
    labels = (y > 0.5).int().argmax(1).cpu().numpy() if multilabel else y.cpu().numpy()
    counts = np.bincount(labels, minlength=n_classes)
    k = min(folds, int(counts[counts > 0].min())) if len(labels) else 0
    scores: dict[str, float] = {}
    verdicts: dict[str, np.ndarray] = {}
    if k >= 2 and len(penalties) > 1:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(len(labels)), labels))
        for lam in penalties:
            correct, fold_maps = 0, []
            right = np.zeros(len(labels), dtype=bool)
            for tr, te in splits:
                ftr = torch.as_tensor(tr, device=x.device)
                fte = torch.as_tensor(te, device=x.device)
                # Each fold standardised on its own training part, as the final fit is.
                m, s = _standardise(x[ftr])
                w, b = _solve((x[ftr] - m) / s, y[ftr], n_classes, lam, loss_fn, max_iter)
                out = ((x[fte] - m) / s) @ w.T + b
                if multilabel:
                    fold_maps.append(fold_map(out, y[fte]))
                else:
                    hits = (out.argmax(1) == y[fte]).cpu().numpy()
                    right[te] = hits
                    correct += int(hits.sum())
            scores[f"{lam:g}"] = float(np.mean(fold_maps)) if multilabel else correct / len(labels)
            if not multilabel:
                verdicts[f"{lam:g}"] = right
        best = max(scores.values())
        # The strongest penalty within half an image of the best (fewer, smaller weights).
        chosen = max(lam for lam in penalties if scores[f"{lam:g}"] >= best - 0.5 / len(labels))
    else:
        chosen = penalties[len(penalties) // 2]
        k = 0
    w, b = _solve(z, y, n_classes, chosen, loss_fn, max_iter)
    weight = w / std
    bias = b - weight @ mean
    metric = "map" if multilabel else "accuracy"
    return LinearFit(weight, bias, chosen, scores, k, metric, verdicts)


def fold_map(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean average precision of a fold, over the classes with a positive in it."""
    truth = (targets > 0.5).cpu().numpy()
    present = truth.any(0)
    if not present.any():
        return 0.0
    scores = logits.float().cpu().numpy()
    return float(average_precision_score(truth[:, present], scores[:, present], average="macro"))


# Most floats one joint fit of `out_of_fold_logits` holds (16M, 64 MB: the folds' logits
# and their weights with L-BFGS's copies of them): past it the folds are fitted in smaller
# groups, down to one at a time (memory as separate fits then).
FOLD_LOGITS_MAX = 1 << 24


@single_threaded
def out_of_fold_logits(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    splits: list[tuple[np.ndarray, np.ndarray]],
    penalty: float,
    *,
    max_iter: int = 100,
) -> torch.Tensor:
    """(images, classes) logits, each row from a logistic regression fitted on the training
    part of the split that holds that row out: what one `fit_linear(..., penalties=(penalty,))`
    per split gives (features standardised on each training part, `penalty` on the
    standardised weights), with the plain loss: softmax cross-entropy over class indices `y`,
    or, for float multi-hot `y`, BCE summed over the classes and averaged over the images.

    The splits are solved as one problem: the sum of their losses is separable, so its
    minimum is each split's own, but each of L-BFGS's evaluations is then one product of
    all the images with every split's weights (a split's loss masked to its training
    rows), the gradient written out (probabilities minus targets) rather than taped. On
    the label-issues benchmark's saved features (5 splits of about 490 images, 1,280
    features) that took half the time of five separate fits, probabilities within 0.01.
    `max_iter` bounds the joint problem's iterations: it needed about as many as its
    slowest split alone (50 to 100 there)."""
    x = x.float()
    x = x - x.mean(0)  # the folds' means are then small: their folding-in cancels less
    # A fold holds its logits and its weights, of which L-BFGS keeps about 44 copies (the
    # 20 pairs of its history, the gradient, the step).
    per_fold = len(x) * n_classes + 44 * n_classes * x.shape[1]
    per_group = max(1, FOLD_LOGITS_MAX // max(1, per_fold))
    out = torch.zeros(len(x), n_classes, device=x.device)
    for start in range(0, len(splits), per_group):
        group = splits[start : start + per_group]
        logits = _joint_fit(x, y, n_classes, group, penalty, max_iter)
        for k, (_, held) in enumerate(group):
            rows = torch.as_tensor(held, device=x.device)
            out[rows] = logits[rows, k]
    return out


def _joint_fit(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    splits: list[tuple[np.ndarray, np.ndarray]],
    penalty: float,
    max_iter: int,
) -> torch.Tensor:
    """(images, splits, classes): every split's logits of every image, its weights fitted
    on its training rows (L-BFGS as `_solve` runs it)."""
    n, d, k = len(x), x.shape[1], len(splits)
    multilabel = y.ndim == 2
    share = torch.zeros(n, k, 1, device=x.device)  # each row's weight in each split's loss
    means, stds = [], []
    for j, (train, _) in enumerate(splits):
        rows = torch.as_tensor(train, device=x.device)
        share[rows, j] = 1.0 / len(train)
        m, s = _standardise(x[rows])
        means.append(m)
        stds.append(s)
    mean, std = torch.stack(means)[:, None, :], torch.stack(stds)[:, None, :]  # (k, 1, d)
    if multilabel:
        target = y.float()[:, None, :]
    else:
        target = nn.functional.one_hot(y.long(), n_classes).float()[:, None, :]
    w = torch.zeros(k, n_classes, d, device=x.device, requires_grad=True)
    b = torch.zeros(k, n_classes, device=x.device, requires_grad=True)

    def logits() -> torch.Tensor:
        # The standardisation folded into the weights: ((x - m) / s) w' + b = x v' + c.
        v = w / std
        return (x @ v.reshape(-1, d).T).view(n, k, n_classes) + b - (v * mean).sum(2)

    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    @torch.no_grad()
    def closure() -> torch.Tensor:
        z = logits()
        if multilabel:
            per_row = (nn.functional.softplus(z) - target * z).sum(2, keepdim=True)
            residual = torch.sigmoid(z) - target
        else:
            lse = torch.logsumexp(z, 2, keepdim=True)
            per_row = lse - (z * target).sum(2, keepdim=True)
            residual = torch.exp(z - lse) - target
        loss = (per_row * share).sum() + 0.5 * penalty * (w * w).sum()
        residual = residual * share  # d loss / d logits
        grad_v = (residual.reshape(n, -1).T @ x).view(k, n_classes, d)
        grad_c = residual.sum(0)
        w.grad = (grad_v - grad_c[..., None] * mean) / std + penalty * w
        b.grad = grad_c
        return loss

    opt.step(closure)  # type: ignore[arg-type]
    with torch.no_grad():
        return logits()

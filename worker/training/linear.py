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
    if k >= 2 and len(penalties) > 1:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(len(labels)), labels))
        for lam in penalties:
            correct, fold_maps = 0, []
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
                    correct += int((out.argmax(1) == y[fte]).sum())
            scores[f"{lam:g}"] = float(np.mean(fold_maps)) if multilabel else correct / len(labels)
        best = max(scores.values())
        # The strongest penalty within half an image of the best (fewer, smaller weights).
        chosen = max(lam for lam in penalties if scores[f"{lam:g}"] >= best - 0.5 / len(labels))
    else:
        chosen = penalties[len(penalties) // 2]
        k = 0
    w, b = _solve(z, y, n_classes, chosen, loss_fn, max_iter)
    weight = w / std
    bias = b - weight @ mean
    return LinearFit(weight, bias, chosen, scores, k, "map" if multilabel else "accuracy")


def fold_map(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean average precision of a fold, over the classes with a positive in it."""
    truth = (targets > 0.5).cpu().numpy()
    present = truth.any(0)
    if not present.any():
        return 0.0
    scores = logits.float().cpu().numpy()
    return float(average_precision_score(truth[:, present], scores[:, present], average="macro"))

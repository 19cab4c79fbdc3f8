"""A linear classifier on cached features: multinomial logistic regression solved by
L-BFGS (torch.optim.LBFGS, full batch), its L2 penalty chosen by stratified k-fold
cross-validation, the features standardised and the standardisation folded into the
returned weights, so the result drops into the network's own `nn.Linear` head.

It minimises the job's own loss (`loss_fn`: class weights, label smoothing), so the probed
head is fitted to the objective fine-tuning continues with. On cached features a fit takes
milliseconds to a second: this is the "cheap" phase that always completes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

# L2 penalties tried (per sample, on standardised features). sklearn's C is 1 / (lam * n).
PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class LinearFit:
    weight: torch.Tensor  # (classes, features), standardisation folded in
    bias: torch.Tensor  # (classes,)
    penalty: float
    cv_scores: dict[str, float] = field(default_factory=dict)  # penalty -> mean fold accuracy
    folds: int = 0

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
            "cv_accuracy": {k: round(v, 4) for k, v in self.cv_scores.items()},
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
    std = x.std(0, unbiased=False).clamp_min(1e-3)  # near-constant features: not blown up
    return mean, std


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
    mean accuracy over stratified folds (ties: the stronger penalty), refitted on all."""
    x = x.float()
    mean, std = _standardise(x)
    z = (x - mean) / std
    labels = y.cpu().numpy()
    counts = np.bincount(labels, minlength=n_classes)
    k = min(folds, int(counts[counts > 0].min())) if len(labels) else 0
    scores: dict[str, float] = {}
    if k >= 2 and len(penalties) > 1:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(len(labels)), labels))
        for lam in penalties:
            correct = 0
            for tr, te in splits:
                ftr = torch.as_tensor(tr, device=x.device)
                fte = torch.as_tensor(te, device=x.device)
                # Each fold standardised on its own training part, as the final fit is.
                m, s = _standardise(x[ftr])
                w, b = _solve((x[ftr] - m) / s, y[ftr], n_classes, lam, loss_fn, max_iter)
                pred = (((x[fte] - m) / s) @ w.T + b).argmax(1)
                correct += int((pred == y[fte]).sum())
            scores[f"{lam:g}"] = correct / len(labels)
        best = max(scores.values())
        # The strongest penalty within half an image of the best (fewer, smaller weights).
        chosen = max(lam for lam in penalties if scores[f"{lam:g}"] >= best - 0.5 / len(labels))
    else:
        chosen = penalties[len(penalties) // 2]
        k = 0
    w, b = _solve(z, y, n_classes, chosen, loss_fn, max_iter)
    weight = w / std
    bias = b - weight @ mean
    return LinearFit(weight, bias, chosen, scores, k)

"""The probe's solver: logistic regression on cached features, penalty by cross-validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn

from worker.training import linear
from worker.training.linear import PENALTIES, fit_linear, out_of_fold_logits


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    x = torch.cat(
        [centers[c] + spread * torch.randn(n_per_class, dim, generator=g) for c in range(classes)]
    )
    y = torch.arange(classes).repeat_interleave(n_per_class)
    # Features on very different scales and offsets, as pooled CNN features are.
    scale = torch.logspace(-2, 2, dim)
    return x * scale + 5.0, y


def test_separable_classes_are_learned_and_standardisation_is_folded_in():
    x, y = blobs(40, 4, 16, 0.5)
    fit = fit_linear(x, y, 4, nn.CrossEntropyLoss(), seed=0)
    # The returned weights act on raw features: the standardisation is inside them.
    assert (fit.logits(x).argmax(1) == y).float().mean() > 0.97
    assert fit.folds == 3
    assert set(fit.cv_scores) == {f"{p:g}" for p in PENALTIES}
    assert fit.penalty in PENALTIES
    # Each image's held-out verdict, per penalty: what the scores are the mean of (the
    # recipe compares two candidates image by image with them).
    assert set(fit.cv_correct) == set(fit.cv_scores)
    for key, right in fit.cv_correct.items():
        assert right.shape == (len(y),) and right.mean() == pytest.approx(fit.cv_scores[key])


def test_cross_validation_picks_a_stronger_penalty_for_noisy_high_dimensional_data():
    # Few images, many features, heavy overlap: a weak penalty overfits.
    x, y = blobs(12, 3, 400, 6.0, seed=1)
    noisy = fit_linear(x, y, 3, nn.CrossEntropyLoss(), seed=0)
    x2, y2 = blobs(60, 3, 8, 0.3, seed=2)
    clean = fit_linear(x2, y2, 3, nn.CrossEntropyLoss(), seed=0)
    assert noisy.penalty >= clean.penalty
    # The chosen penalty is (within half an image) the best-scoring one.
    best = max(noisy.cv_scores.values())
    assert noisy.cv_scores[f"{noisy.penalty:g}"] >= best - 0.5 / len(y)


def test_held_out_accuracy_beats_chance_clearly():
    x, y = blobs(50, 5, 32, 2.0, seed=3)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:150], perm[150:]
    fit = fit_linear(x[tr], y[tr], 5, nn.CrossEntropyLoss(), seed=0)
    assert (fit.logits(x[te]).argmax(1) == y[te]).float().mean() > 0.8


def test_the_job_loss_is_what_is_minimised_and_the_head_takes_the_weights():
    x, y = blobs(30, 3, 8, 1.0)
    weights = torch.tensor([1.0, 1.0, 5.0])
    fit = fit_linear(x, y, 3, nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1))
    head = nn.Linear(8, 3)
    fit.load_into(head)
    with torch.no_grad():
        assert torch.allclose(head(x), fit.logits(x), atol=1e-4)
    summary = fit.summary()
    assert summary["solver"] == "lbfgs" and summary["cv_folds"] == 3


def test_a_class_with_one_image_means_no_cross_validation():
    x, y = blobs(6, 3, 8, 0.5)
    x, y = torch.cat([x, x[:1] + 0.1]), torch.cat([y, torch.tensor([3])])
    fit = fit_linear(x, y, 4, nn.CrossEntropyLoss())
    assert fit.folds == 0 and fit.cv_scores == {}
    assert fit.weight.shape == (4, 8)


class SummedBCE(nn.Module):
    """BCE summed over the classes, averaged over the images: `out_of_fold_logits`'s
    multi-label loss, for the separate fits to compare with."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return loss.sum(1).mean()


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_the_folds_solved_together_give_each_folds_own_probe(
    monkeypatch, multilabel, one_at_a_time
):
    """The joint problem's minimum is every fold's own: its held-out logits match one
    `fit_linear` per fold (same penalty, same standardisation), also when the folds are too
    many to hold together and are solved one at a time."""
    x, labels = blobs(40, 4, 24, 2.5, seed=4)
    if multilabel:  # each image also carries the next class, half the time
        y = nn.functional.one_hot(labels, 4).float()
        extra = torch.rand(len(labels), generator=torch.Generator().manual_seed(1)) < 0.5
        y[extra, (labels[extra] + 1) % 4] = 1.0
        loss_fn: nn.Module = SummedBCE()
    else:
        y, loss_fn = labels, nn.CrossEntropyLoss()
    if one_at_a_time:
        monkeypatch.setattr(linear, "FOLD_LOGITS_MAX", 1)
    splits = list(StratifiedKFold(4, shuffle=True, random_state=0).split(x, labels))
    joint = out_of_fold_logits(x, y, 4, splits, 1e-2, max_iter=500)
    separate = torch.zeros_like(joint)
    for train, held in splits:
        fit = fit_linear(x[train], y[train], 4, loss_fn, penalties=(1e-2,), max_iter=500)
        separate[held] = fit.logits(x[held])
    assert not torch.allclose(separate, torch.zeros_like(separate))
    diff = (joint - separate).abs().max()
    assert diff < 1e-2 * separate.abs().max(), (diff, separate.abs().max())
    probs = joint.sigmoid() if multilabel else joint.softmax(1)
    reference = separate.sigmoid() if multilabel else separate.softmax(1)
    assert np.abs((probs - reference).numpy()).max() < 2e-3

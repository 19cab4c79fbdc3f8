"""The two hand-written baselines the service has to beat, written the way a user would write
them: plain PyTorch + timm, and scikit-learn. They share only the pretrained weights with the
service (`worker.training.backbones.create_model`, which finds the EfficientNet-Lite0
ImageNet weights that ship offline) and nothing of its training code.

Each one honours a wall-clock budget that starts before the images are read: decoding,
resizing, feature extraction and training all count. Scoring the test images afterwards
does not (as for the service, whose budget covers training only).

- `full_finetune` (a): the whole of efficientnet_lite0 at 128 px, AdamW with a one-cycle
  schedule, random crop + horizontal flip, label smoothing 0.1, as many epochs as fit the
  budget (sized from the time of the first steps); no validation split, the last weights.
- `logreg_on_features` (b): frozen efficientnet_lite0 at 224 px as a feature extractor,
  scikit-learn's LogisticRegression on the pooled features. When extracting every training
  image would not fit the budget, it stops early and fits on the images it got (taken
  round-robin over the classes, so each class is represented).

On a GPU (`device="cuda"`) both run as such a script does: the model and each batch moved
there with `.to(device)`, full precision (no autocast, no channels-last: the service's own
GPU tricks are what is measured against them).

Multi-label data (a 2-D multi-hot label matrix) trains with a sigmoid/BCE loss in (a) and
one-vs-rest logistic regressions in (b); scores are then per-class probabilities.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch import nn

from core.backbones import BACKBONES
from worker.training.backbones import create_model

BACKBONE = "efficientnet_lite0"
Loader = Callable[[], tuple[list[Image.Image], np.ndarray]]


@dataclass
class Trained:
    """A baseline's model, ready to score images: `predict(images) -> (N, C) scores`."""

    predict: Callable[[list[Image.Image]], np.ndarray]
    seconds: float  # wall time used, data loading included
    info: dict[str, Any] = field(default_factory=dict)


def to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size): RGB, resized (bicubic) to a square."""
    arrays = [
        np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
        for img in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _normalize() -> T.Normalize:
    spec = BACKBONES[BACKBONE]
    return T.Normalize(spec.mean, spec.std)


@torch.no_grad()
def _scores(
    model: nn.Module, x: torch.Tensor, multilabel: bool, device: str = "cpu", batch: int = 128
) -> np.ndarray:
    model.eval()
    norm = _normalize()
    out = []
    for i in range(0, len(x), batch):
        logits = model(norm(x[i : i + batch].to(device).float() / 255.0))
        out.append(torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1))
    return torch.cat(out).cpu().numpy()


def full_finetune(
    load: Loader,
    n_classes: int,
    budget: float,
    seed: int,
    image_size: int = 128,
    batch_size: int = 32,
    lr: float = 1e-3,
    hflip: bool = True,
    device: str = "cpu",
) -> Trained:
    """Baseline (a); see the module docstring."""
    t0 = time.perf_counter()
    deadline = t0 + budget
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, labels = load()
    x = to_tensor(images, image_size)
    multilabel = labels.ndim == 2
    y = torch.as_tensor(labels, dtype=torch.float32 if multilabel else torch.long).to(device)
    model = create_model(BACKBONE, n_classes).to(device)
    crop = [T.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True)]
    augment = T.Compose([*crop, *([T.RandomHorizontalFlip()] if hflip else [])])
    norm = _normalize()
    loss_fn: nn.Module = (
        nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss(label_smoothing=0.1)
    )
    batch_size = min(batch_size, len(x))
    steps_per_epoch = max(1, len(x) // batch_size)  # drop the last partial batch (BatchNorm)
    # The first steps run at one-cycle's starting LR and are timed to size the schedule.
    opt = torch.optim.AdamW(model.parameters(), lr=lr / 25, weight_decay=0.05)

    def batches() -> Any:
        while True:
            order = rng.permutation(len(x))
            for b in range(steps_per_epoch):
                yield order[b * batch_size : (b + 1) * batch_size]

    def step(idx: np.ndarray) -> float:
        xb = torch.stack([augment(x[i]) for i in idx]).to(device).float() / 255.0
        loss = loss_fn(model(norm(xb)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    model.train()
    stream = batches()
    # Two steps at the starting LR: the first warms up, the second is timed.
    losses = [step(next(stream))]
    start = time.perf_counter()
    losses.append(step(next(stream)))
    per_step = time.perf_counter() - start
    done = 2
    # As many whole epochs as fit (a 5% margin); less than one epoch when not even one fits.
    left_steps = int(max(0.0, deadline - time.perf_counter()) * 0.95 / per_step)
    total = done + left_steps
    if total >= steps_per_epoch:
        total = max(done, (total // steps_per_epoch) * steps_per_epoch)
    planned = total - done
    if planned > 1:
        # OneCycleLR divides by its phase lengths: too few steps for phases, keep the LR flat.
        schedule: Any = (
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=planned, pct_start=0.25)
            if planned >= 8
            else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
        )
        for _ in range(planned):
            if time.perf_counter() > deadline:
                break  # the estimate was off (a busy machine): the budget is the budget
            losses.append(step(next(stream)))
            schedule.step()
            done += 1
    seconds = time.perf_counter() - t0
    model.eval()
    return Trained(
        predict=lambda imgs: _scores(model, to_tensor(imgs, image_size), multilabel, device),
        seconds=seconds,
        info={
            "steps": done,
            "epochs": round(done / steps_per_epoch, 2),
            "planned_epochs": round(total / steps_per_epoch, 2),
            "last_loss": round(float(np.mean(losses[-10:])), 4),
        },
    )


def _round_robin(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices alternating over the classes (each class's own order shuffled)."""
    key = labels.argmax(1) if labels.ndim == 2 else labels
    queues = [list(rng.permutation(np.flatnonzero(key == c))) for c in np.unique(key)]
    order: list[int] = []
    while any(queues):
        for q in queues:
            if q:
                order.append(int(q.pop()))
    return np.asarray(order)


def logreg_on_features(
    load: Loader,
    n_classes: int,
    budget: float,
    seed: int,
    image_size: int = 224,
    batch_size: int = 32,
    device: str = "cpu",
) -> Trained:
    """Baseline (b); see the module docstring."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    # Leave time for the regression itself: it cannot be stopped half-way.
    extract_until = t0 + budget * 0.85
    torch.manual_seed(seed)
    images, labels = load()
    multilabel = labels.ndim == 2
    backbone = create_model(BACKBONE, 0).to(device).eval()  # 0 classes: the pooled features
    norm = _normalize()
    order = _round_robin(labels, np.random.default_rng(seed))
    feats, used, per_batch = [], 0, 0.0
    with torch.no_grad():
        for b in range(math.ceil(len(order) / batch_size)):
            # Stop before a batch that would end past the deadline (the first always runs).
            if b > 0 and time.perf_counter() + per_batch > extract_until:
                break
            start = time.perf_counter()
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = to_tensor([images[i] for i in idx], image_size).to(device).float() / 255.0
            feats.append(backbone(norm(x)).cpu().numpy())
            used += len(idx)
            per_batch = time.perf_counter() - start
    features, y = np.concatenate(feats), labels[order[:used]]
    lr = LogisticRegression(C=1.0, max_iter=500)
    clf = make_pipeline(StandardScaler(), OneVsRestClassifier(lr) if multilabel else lr)
    clf.fit(features, y)
    seconds = time.perf_counter() - t0

    @torch.no_grad()
    def predict(imgs: list[Image.Image]) -> np.ndarray:
        out = []
        for i in range(0, len(imgs), batch_size):
            x = to_tensor(imgs[i : i + batch_size], image_size).to(device).float() / 255.0
            out.append(backbone(norm(x)).cpu().numpy())
        proba = clf.predict_proba(np.concatenate(out))
        if multilabel:
            return np.asarray(proba)
        # Columns follow the classes seen in training; unseen classes score 0.
        full = np.zeros((len(proba), n_classes))
        full[:, clf.classes_] = proba
        return full

    return Trained(
        predict=predict,
        seconds=seconds,
        info={"images_used": used, "of": len(order)},
    )

"""What the auto recipe measures (`recipe.py`): backbones with weights on this host, a
class-balanced subsample decoded once, its pooled features at a candidate size and the
inference speed they took, the training speed of a few steps, and whether mirrored copies
help a cross-validated probe (the flip check)."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from core.backbones import BACKBONES
from worker.training.data import resize_center_crop, to_rgb
from worker.training.linear import fit_linear, fold_map
from worker.training.weights import WeightsSource


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


def subsample(labels: np.ndarray, pool: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Up to `k` indices of `pool`, every class represented (round robin over classes)."""
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(pool[labels[pool] == c])) for c in np.unique(labels[pool])]
    out: list[int] = []
    while len(out) < k and any(queues):
        for q in queues:
            if q and len(out) < k:
                out.append(int(q.pop()))
    return np.sort(np.asarray(out, dtype=np.int64))


def decode(archive: Path, paths: list[str], longest: int) -> list[Image.Image]:
    """The images, RGB, shrunk (never enlarged) so their shorter side is at most `longest`."""
    out = []
    with zipfile.ZipFile(archive) as zf:
        for name in paths:
            with zf.open(name) as f, Image.open(f) as opened:
                rgb = to_rgb(opened)  # as training and prediction convert it
                w, h = rgb.size
                if min(w, h) > longest:
                    s = longest / min(w, h)
                    rgb = rgb.resize((max(1, round(w * s)), max(1, round(h * s))))
                out.append(rgb)
    return out


def tensor(images: list[Image.Image], backbone: str, size: int, flip: bool = False) -> torch.Tensor:
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


def _as_trained(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch as the training loop feeds it: on the device, channels-last."""
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def _autocast(device: torch.device, backbone: str | None) -> torch.autocast:
    """The loop's autocast for this backbone on this device (`runtime.amp_dtype_for`)."""
    from worker.training.runtime import amp_dtype_for

    amp = amp_dtype_for(device, backbone)
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


@torch.no_grad()
def features(
    model: nn.Module, x: torch.Tensor, device: torch.device, backbone: str | None = None
) -> tuple[torch.Tensor, float]:
    """Pooled features and images/s, with the backbone's precision and memory format as
    `loop.predict` runs it (autocast per backbone, channels-last). On a GPU
    the timed batches are the full ones, after a warm-up batch of their size, and the last,
    partial one is not timed: a GPU may prepare kernels for each new input shape (seconds
    on an H200), a cost a training pass pays once. The CPU times every batch after an
    8-image warm-up."""
    model.eval()
    batch = 64
    cuda = device.type == "cuda"
    model.to(memory_format=torch.channels_last)  # as `fit` trains it, on every device
    warm = batch if cuda else 8  # the CPU prepares nothing per shape
    timed = ((len(x) // batch) * batch or len(x)) if cuda else len(x)
    with _autocast(device, backbone):
        model(_as_trained(x[:warm], device))  # warm-up: first-call allocation, kernels
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = [
            model(_as_trained(x[i : min(i + batch, timed)], device)).float().cpu()
            for i in range(0, timed, batch)
        ]
        if cuda:
            torch.cuda.synchronize()
        seconds = max(time.perf_counter() - t0, 1e-6)
        if timed < len(x):
            out.append(model(_as_trained(x[timed:], device)).float().cpu())
    return torch.cat(out), timed / seconds


TRAIN_BATCH = {"cpu": 16, "cuda": 64}  # the timed step's batch (cuda: the recipe's batch)


def train_rate(
    model: nn.Module,
    x: torch.Tensor,
    n_classes: int,
    device: torch.device,
    backbone: str | None = None,
) -> float:
    """Training images/s at this input size, timed after warm-up steps, channels-last as
    the loop runs it. On a GPU also with the loop's autocast, on the batch the recipe trains
    with: a small batch's step costs a GPU about what a full one does (kernel launches)."""
    head = nn.Linear(model.num_features, n_classes).to(device)  # type: ignore[arg-type]
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-6)
    model.train()
    cuda = device.type == "cuda"
    batch = _as_trained(x[: TRAIN_BATCH["cuda" if cuda else "cpu"]], device)
    warmup = 2 if cuda else 1
    rates = []
    for i in range(warmup + 2):
        t0 = time.perf_counter()
        with _autocast(device, backbone):
            loss = head(model(batch)).float().logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            rates.append(len(batch) / (time.perf_counter() - t0))
    model.eval()
    return float(np.median(rates))


def flip_check(feats: torch.Tensor, mirrored: torch.Tensor, y: torch.Tensor, n: int) -> dict:
    """Do mirrored copies help or hurt? Cross-validated accuracy of the probe fitted on the
    training folds as they are, and on the folds plus their mirror images (what flip
    augmentation trains on), both scored on the held-out fold as it is. ImageNet features
    are nearly mirror-invariant, so this asks the labels, not the features: a mirrored "2"
    labelled 2 is noise for digits and a free extra picture for faces.

    With multi-hot `y` (multi-label) the probes are one-vs-rest (BCE) and scored by mean
    average precision, the task's own metric: `map` and `with_mirrored_map`."""
    from sklearn.model_selection import StratifiedKFold

    multilabel = y.ndim == 2
    # Multi-label: the folds are stratified on each image's first class, as the probe's are.
    labels = (y > 0.5).int().argmax(1).numpy() if multilabel else y.numpy()
    metric = "map" if multilabel else "accuracy"
    counts = np.bincount(labels)
    k = int(min(3, counts[counts > 0].min()))
    if k < 2:
        return {metric: None, f"with_mirrored_{metric}": None}
    plain: list[float] = []
    augmented: list[float] = []
    loss: nn.Module = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=0).split(labels, labels):
        a = fit_linear(feats[tr], y[tr], n, loss, penalties=(1e-2,))
        both = torch.cat([feats[tr], mirrored[tr]])
        b = fit_linear(both, torch.cat([y[tr], y[tr]]), n, loss, penalties=(1e-2,))
        for fitted, scores in ((a, plain), (b, augmented)):
            out = fitted.logits(feats[te])
            if multilabel:  # weighted by the fold's size, as accuracy's counts are
                scores.append(fold_map(out, y[te]) * len(te))
            else:
                scores.append(float((out.argmax(1) == y[te]).sum()))
    return {
        metric: round(sum(plain) / len(y), 4),
        f"with_mirrored_{metric}": round(sum(augmented) / len(y), 4),
    }

"""fit(config, data, callbacks) -> FitResult. Pure PyTorch: no Celery, no DB, no HTTP.

Strategies:
- `linear_probe`: the backbone is frozen; features are computed once and cached, and only
  the head trains (each "epoch" is a pass over cached features: seconds, not minutes);
- `full`: everything trains; the backbone's learning rate is `learning_rate x
  backbone_lr_mult` (default 1.0);
- `lp_ft` (default): a linear probe first (`probe_epochs` on cached features), then
  everything trains with a lower backbone learning rate (default x0.1), so the random head
  does not wreck the pretrained features in the first steps;
- `gradual`: after the probe-free start, the backbone unfreezes from the top, a stage more
  each epoch, spread so the whole network trains by the last epoch.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from worker.training.augment import batch_mixing
from worker.training.backbones import create_model
from worker.training.callbacks import Callbacks
from worker.training.config import TrainConfig
from worker.training.data import PreparedData
from worker.training.loop import predict, train_one_epoch
from worker.training.metrics import classification_report
from worker.training.weights import WeightsSource

log = logging.getLogger(__name__)

MAXIMIZE = {"val_accuracy": True, "val_macro_f1": True, "val_loss": False}


@dataclass
class FitResult:
    model: nn.Module
    classes: list[str]
    history: list[dict[str, Any]]
    best: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    stopped_reason: str | None = None  # "callback", "time_budget", "early_stopping"
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        return self.stopped_reason == "callback"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    # Called inside the task, never at import: a forked worker must not inherit CUDA.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def default_num_workers() -> int:
    # On a small host the model needs every core; reading the uint8 cache is cheap.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    return 0 if cpus <= 4 else min(8, cpus // 2)


class LrPlan:
    """Per-step LR factor. Re-plannable: under a time budget the schedule is shrunk to the
    epochs that fit, so the cosine decay still completes."""

    def __init__(self, schedule: str, steps_per_epoch: int, epochs: int, warmup_steps: int):
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = warmup_steps
        self.replan(epochs)

    def replan(self, epochs: int) -> None:
        self.epochs = epochs
        self.total_steps = max(1, self.steps_per_epoch * epochs)
        self.step_every = max(1, epochs // 3) * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            return float(0.1 ** (step // self.step_every))
        if step < self.warmup_steps:  # cosine with linear warmup
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Control(Callbacks):
    """The caller's callbacks plus the time budget."""

    def __init__(self, inner: Callbacks, budget: float | None):
        self.inner = inner
        self.deadline = time.monotonic() + budget if budget else None
        self.reason: str | None = None

    def on_phase(self, phase: str) -> None:
        self.inner.on_phase(phase)

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.inner.on_step(epoch, step, steps_per_epoch)

    def on_epoch_end(self, metrics: dict[str, Any], best: dict[str, Any]) -> None:
        self.inner.on_epoch_end(metrics, best)

    def should_stop(self) -> bool:
        if self.inner.should_stop():
            self.reason = "callback"
        elif self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "time_budget"
        return self.reason is not None


class _Best:
    """Tracks the best epoch by the selection metric and keeps its weights."""

    def __init__(self, metric: str):
        self.metric = metric
        self.maximize = MAXIMIZE[metric]
        self.metrics: dict[str, Any] = {}
        self.state: dict[str, torch.Tensor] | None = None
        self.stale_epochs = 0

    def _score(self, metrics: dict[str, Any]) -> float:
        value = metrics.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            value = -metrics["train_loss"] if self.maximize else metrics["train_loss"]
        return float(value) if self.maximize else -float(value)

    def update(self, metrics: dict[str, Any], model: nn.Module, min_delta: float = 0.0) -> bool:
        better = not self.metrics or self._score(metrics) > self._score(self.metrics) + min_delta
        if better:
            self.metrics = dict(metrics)
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.stale_epochs = 0
        else:
            self.stale_epochs += 1
        return better


def _class_weights(
    config: TrainConfig, labels: np.ndarray, n_classes: int
) -> tuple[str, torch.Tensor | None]:
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    ratio = counts.max() / max(counts.min(), 1.0)
    mode = config.class_balance
    if mode == "auto":
        mode = "weighted_loss" if ratio > config.imbalance_threshold else "none"
    if mode == "weighted_loss":
        w = counts.sum() / (n_classes * np.maximum(counts, 1.0))
        return mode, torch.tensor(w, dtype=torch.float32)
    return mode, None


def _param_groups(
    model: nn.Module, lr: float, backbone_mult: float, wd: float
) -> list[dict[str, Any]]:
    head_ids = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]
    head = [p for p in model.parameters() if id(p) in head_ids]
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    # No weight decay on norms and biases (1-d tensors).
    groups = [
        {
            "params": [p for p in backbone if p.ndim > 1],
            "lr": lr * backbone_mult,
            "weight_decay": wd,
        },
        {
            "params": [p for p in backbone if p.ndim <= 1],
            "lr": lr * backbone_mult,
            "weight_decay": 0.0,
        },
        {"params": [p for p in head if p.ndim > 1], "lr": lr, "weight_decay": wd},
        {"params": [p for p in head if p.ndim <= 1], "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, steps_per_epoch * epochs)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total + 1
        )
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    plan = LrPlan(config.schedule, steps_per_epoch, epochs, warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, plan)


def _backbone_stages(model: nn.Module) -> list[list[nn.Parameter]]:
    """Backbone parameters grouped bottom (stem) to top, head excluded."""
    from timm.models import group_parameters

    head_ids = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]
    named = dict(model.named_parameters())
    grouped = group_parameters(model, model.group_matcher(coarse=True))  # type: ignore[operator]
    stages = []
    for key in sorted(grouped):
        params = [named[n] for n in grouped[key] if id(named[n]) not in head_ids]
        if params:
            stages.append(params)
    return stages


def _set_trainable(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _epoch_metrics(
    epoch: int, stats: Any, report: dict[str, Any], lr: float, phase: str
) -> dict[str, Any]:
    def r(x: float | None) -> float | None:
        return None if x is None or math.isnan(x) else round(float(x), 6)

    return {
        "epoch": epoch,
        "phase": phase,
        "train_loss": round(stats.loss, 6),
        "train_accuracy": round(stats.accuracy, 6),
        "val_loss": r(report.get("loss")),
        "val_accuracy": r(report.get("top1_accuracy")),
        "val_top5_accuracy": r(report.get("top5_accuracy")),
        "val_macro_f1": r(report.get("macro_f1")),
        "learning_rate": lr,
        "images_per_second": round(stats.images_per_second, 2),
        "loader_images_per_second": round(min(stats.loader_images_per_second, 1e9), 2),
        "epoch_seconds": round(stats.seconds, 3),
    }


@dataclass
class _HeadStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    data_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def loader_images_per_second(self) -> float:
        return float("inf")


def _probe(
    model: nn.Module,
    config: TrainConfig,
    data: PreparedData,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    loss_fn: nn.Module,
    control: _Control,
    epochs: int,
    report_epochs: bool,
    best: _Best,
    history: list[dict[str, Any]],
    loader_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Train only the head on features computed once (eval transform, frozen backbone)."""
    control.on_phase("extracting features")
    t0 = time.perf_counter()
    bs = config.batch_size * 2
    train_feats, train_y = predict(
        model,
        DataLoader(data.eval_train_set(config), batch_size=bs, **loader_kwargs),
        device,
        amp_dtype,
        features=True,
    )
    val_feats, val_y = predict(
        model,
        DataLoader(data.val_set(config), batch_size=bs, **loader_kwargs),
        device,
        amp_dtype,
        features=True,
    )
    extract_seconds = time.perf_counter() - t0
    head = model.get_classifier()  # type: ignore[operator]
    head_params = list(head.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in head_params if p.ndim > 1], "weight_decay": config.effective_weight_decay},
            {"params": [p for p in head_params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
    )
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        TensorDataset(train_feats, train_y),
        batch_size=max(config.batch_size, 64),
        shuffle=True,
        generator=generator,
    )
    steps = len(loader) * epochs
    plan = LrPlan("cosine", len(loader), epochs, max(1, steps // 20))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan)
    val_feats, val_y_dev = val_feats.to(device), val_y.to(device)
    control.on_phase("probing")
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        head.train()
        total, correct, n = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = head(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        head.eval()
        with torch.no_grad():
            val_logits = head(val_feats)
        report = classification_report(val_logits.cpu(), val_y, data.classes) if len(val_y) else {}
        stats = _HeadStats(total / max(n, 1), correct / max(n, 1), n, time.perf_counter() - start)
        if report_epochs:
            control.on_step(epoch, 1, 1)
            metrics = _epoch_metrics(epoch, stats, report, optimizer.param_groups[0]["lr"], "probe")
            history.append(metrics)
            best.update(metrics, model)
            control.on_epoch_end(metrics, best.metrics)
            if _early_stop(config, best):
                control.reason = "early_stopping"
                break
        if control.should_stop():
            break
    del val_y_dev
    final = classification_report(val_logits.cpu(), val_y, data.classes) if len(val_y) else {}
    if not report_epochs:
        # The probed model is a candidate too: fine-tuning must beat it to replace it.
        metrics = _epoch_metrics(0, stats, final, optimizer.param_groups[0]["lr"], "probe")
        history.append(metrics)
        best.update(metrics, model)
        control.on_epoch_end(metrics, best.metrics)
    return {
        "epochs": epochs,
        "feature_seconds": round(extract_seconds, 3),
        "val_accuracy": final.get("top1_accuracy"),
        "val_loss": final.get("loss"),
    }


def _early_stop(config: TrainConfig, best: _Best) -> bool:
    es = config.early_stopping
    return es is not None and best.stale_epochs >= es.patience


def fit(
    config: TrainConfig,
    data: PreparedData,
    callbacks: Callbacks | None = None,
    *,
    device: torch.device | None = None,
    weights: WeightsSource | None = None,
    num_workers: int | None = None,
    pretrained: bool = True,
) -> FitResult:
    control = _Control(callbacks or Callbacks(), config.time_budget_seconds)
    device = device or pick_device()
    amp_dtype = amp_dtype_for(device)
    seed_everything(config.seed)
    n_classes = len(data.classes)

    model = create_model(config.backbone, n_classes, pretrained, weights)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    workers = default_num_workers() if num_workers is None or num_workers < 0 else num_workers
    loader_kwargs: dict[str, Any] = dict(
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0
    )
    train_labels = np.asarray(data.labels)[data.train_idx]
    if len(train_labels) == 0:
        raise ValueError("the training split is empty")
    balance, class_weights = _class_weights(config, train_labels, n_classes)
    loss_fn = nn.CrossEntropyLoss(
        weight=class_weights.to(device) if class_weights is not None else None,
        label_smoothing=config.label_smoothing,
    )
    metric = config.early_stopping.metric if config.early_stopping else "val_accuracy"
    best = _Best(metric)
    history: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"class_balance": balance, "strategy": config.strategy}

    if config.strategy in ("linear_probe", "lp_ft"):
        _set_trainable([p for p in model.parameters()], False)
        _set_trainable(list(model.get_classifier().parameters()), True)  # type: ignore[operator]
        is_probe_only = config.strategy == "linear_probe"
        extra["probe"] = _probe(
            model,
            config,
            data,
            device,
            amp_dtype,
            loss_fn,
            control,
            config.epochs if is_probe_only else config.probe_epochs,
            is_probe_only,
            best,
            history,
            loader_kwargs,
        )
        _set_trainable(list(model.parameters()), True)

    if config.strategy != "linear_probe" and control.reason is None:
        _fine_tune(
            model,
            config,
            data,
            device,
            amp_dtype,
            loss_fn,
            control,
            best,
            history,
            loader_kwargs,
            extra,
        )

    if best.state is not None:
        model.load_state_dict(best.state)
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    report = _final_report(model, config, data, loader_kwargs)
    return FitResult(
        model=model,
        classes=data.classes,
        history=history,
        best=best.metrics,
        report=report,
        stopped_reason=control.reason,
        device=str(device),
        extra=extra,
    )


def _fine_tune(
    model: nn.Module,
    config: TrainConfig,
    data: PreparedData,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    loss_fn: nn.Module,
    control: _Control,
    best: _Best,
    history: list[dict[str, Any]],
    loader_kwargs: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    train_set = data.train_set(config)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = None
    if extra["class_balance"] == "balanced_sampler":
        labels = np.asarray(data.labels)[data.train_idx]
        counts = np.bincount(labels, minlength=len(data.classes)).astype(float)
        sampler = WeightedRandomSampler(
            (1.0 / counts[labels]).tolist(), len(labels), generator=generator
        )
    batch_size = min(config.batch_size, len(train_set))
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(train_set) > batch_size,  # no 1-image batch for BatchNorm
        generator=generator if sampler is None else None,
        **loader_kwargs,
    )
    val_loader = DataLoader(data.val_set(config), batch_size=config.batch_size * 2, **loader_kwargs)
    mult = config.effective_backbone_lr_mult
    optimizer = _make_optimizer(
        config, _param_groups(model, config.learning_rate, mult, config.effective_weight_decay)
    )
    scheduler = _make_scheduler(config, optimizer, len(train_loader), config.epochs)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    mixing = batch_mixing(config, len(data.classes))
    stages = _backbone_stages(model) if config.strategy == "gradual" else []
    train_model: nn.Module = torch.compile(model) if config.compile else model  # type: ignore[assignment]

    control.on_phase("training")
    plan: LrPlan | None = getattr(scheduler, "lr_lambdas", [None])[0]
    planned = config.epochs
    started = time.monotonic()
    epoch = 0
    while epoch < planned:
        epoch += 1
        if stages:
            unfrozen = math.ceil(epoch * len(stages) / planned)
            for i, params in enumerate(stages):
                _set_trainable(params, i >= len(stages) - unfrozen)
        lr = optimizer.param_groups[-1]["lr"]
        stats = train_one_epoch(
            train_model,
            train_loader,
            optimizer,
            scheduler,
            loss_fn,
            device,
            epoch,
            control,
            amp_dtype,
            scaler,
            mixing,
            config.grad_clip_norm,
            freeze_norm_stats=config.effective_freeze_norm_stats,
        )
        if stats.stopped and control.reason == "callback":
            break
        logits, targets = predict(train_model, val_loader, device, amp_dtype)
        report = classification_report(logits, targets, data.classes) if len(targets) else {}
        metrics = _epoch_metrics(epoch, stats, report, lr, "fine_tune")
        history.append(metrics)
        es = config.early_stopping
        best.update(metrics, model, es.min_delta if es else 0.0)
        log.info("epoch %d/%d %s", epoch, config.epochs, metrics)
        control.on_epoch_end(metrics, best.metrics)
        if stats.stopped:
            break
        if _early_stop(config, best):
            control.reason = "early_stopping"
            break
        if control.deadline is not None and isinstance(plan, LrPlan):
            # Fit the schedule to the epochs the time budget leaves room for.
            per_epoch = (time.monotonic() - started) / epoch
            fits = epoch + int(max(0.0, control.deadline - time.monotonic()) // per_epoch)
            if fits < planned:
                planned = fits  # >= epoch: at worst, this epoch was the last
                plan.replan(planned)
                extra["epochs_fitted_to_budget"] = planned
    _set_trainable(list(model.parameters()), True)


def _final_report(
    model: nn.Module, config: TrainConfig, data: PreparedData, loader_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Full evaluation of the chosen model on the validation (and test) split."""
    kwargs = {**loader_kwargs, "pin_memory": False}
    report: dict[str, Any] = {}
    for name, dataset in (("validation", data.val_set(config)), ("test", data.test_set(config))):
        if dataset is None or len(dataset) == 0:
            continue
        logits, targets = predict(
            model,
            DataLoader(dataset, batch_size=config.batch_size * 2, **kwargs),
            torch.device("cpu"),
        )
        report[name] = classification_report(logits, targets, data.classes)
    return report

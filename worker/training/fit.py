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

import copy
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from core.jobspec import JobSpec
from worker.training.augment import batch_mixing
from worker.training.backbones import create_model
from worker.training.callbacks import Callbacks
from worker.training.data import PreparedData
from worker.training.loop import EpochSampler, EpochStats, predict, train_one_epoch
from worker.training.metrics import classification_report
from worker.training.optim import (
    LrPlan,
    backbone_stages,
    class_weights,
    make_optimizer,
    make_scheduler,
    param_groups,
    set_trainable,
)
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

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        self.inner.on_checkpoint(state)

    def checkpoint_on_stop(self) -> bool:
        return self.inner.checkpoint_on_stop()

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


def _cpu_copy(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples in which every tensor is a CPU copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.copy(obj)


@dataclass
class _Run:
    """What the phases of one `fit` share."""

    model: nn.Module
    config: JobSpec
    data: PreparedData
    device: torch.device
    amp_dtype: torch.dtype | None
    loss_fn: nn.Module
    control: _Control
    best: _Best
    history: list[dict[str, Any]]
    loader_kwargs: dict[str, Any]
    extra: dict[str, Any]
    resume: dict[str, Any] | None = None

    def checkpoint(self, phase: str, epoch: int, **training: Any) -> None:
        """Hand the callbacks a resumable snapshot (CPU tensors, plain containers)."""
        if type(self.control.inner).on_checkpoint is Callbacks.on_checkpoint:
            return  # nobody keeps checkpoints (benchmarks, plain `fit` calls): build none
        state: dict[str, Any] = {
            "version": 1,
            "phase": phase,
            "epoch": epoch,
            "model": _cpu_copy(self.model.state_dict()),
            "best_metrics": dict(self.best.metrics),
            "best_state": self.best.state,
            "stale_epochs": self.best.stale_epochs,
            "history": [dict(h) for h in self.history],
            "extra": {k: v for k, v in self.extra.items() if k != "resumed_from"},
            "torch_rng": torch.get_rng_state(),
        }
        # A snapshot: optimizer state_dicts hold the live tensors, which the next step mutates;
        # copied straight to the CPU (a deepcopy would first clone them on the GPU).
        state.update(_cpu_copy(training))
        self.control.on_checkpoint(state)


def _probe(run: _Run, epochs: int, report_epochs: bool) -> dict[str, Any]:
    """Train only the head on features computed once (eval transform, frozen backbone).
    With `report_epochs` (linear_probe) each head epoch is an epoch of the job; otherwise
    (lp_ft) the probed model is recorded once, as epoch 0."""
    model, config, data, device = run.model, run.config, run.data, run.device
    control, best, history = run.control, run.best, run.history
    amp_dtype, loss_fn, loader_kwargs = run.amp_dtype, run.loss_fn, run.loader_kwargs
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
            {
                "params": [p for p in head_params if p.ndim > 1],
                "weight_decay": config.effective_weight_decay,
            },
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
    val_feats = val_feats.to(device)
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
        # No loader in a head epoch: features are in memory (data_seconds 0).
        stats = EpochStats(
            total / max(n, 1), correct / max(n, 1), n, time.perf_counter() - start, 0.0
        )
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


def _early_stop(config: JobSpec, best: _Best) -> bool:
    es = config.early_stopping
    return es is not None and best.stale_epochs >= es.patience


def fit(
    config: JobSpec,
    data: PreparedData,
    callbacks: Callbacks | None = None,
    *,
    device: torch.device | None = None,
    weights: WeightsSource | None = None,
    num_workers: int | None = None,
    pretrained: bool = True,
    resume: dict[str, Any] | None = None,
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
    balance, weights_per_class = class_weights(config, train_labels, n_classes)
    loss_fn = nn.CrossEntropyLoss(
        weight=weights_per_class.to(device) if weights_per_class is not None else None,
        label_smoothing=config.label_smoothing,
    )
    metric = config.early_stopping.metric if config.early_stopping else "val_accuracy"
    best = _Best(metric)
    history: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"class_balance": balance, "strategy": config.strategy}

    run = _Run(
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
        resume,
    )
    if resume is not None:
        # Pick up where a lost attempt left off: its weights, history and best epoch.
        model.load_state_dict(resume["model"])
        history.extend(resume["history"])
        best.metrics, best.state = dict(resume["best_metrics"]), resume["best_state"]
        best.stale_epochs = int(resume["stale_epochs"])
        extra.update(resume["extra"])
        extra["resumed_from"] = {"phase": resume["phase"], "epoch": int(resume["epoch"])}
        if resume.get("partial"):
            extra["resumed_from"]["step"] = int(resume["partial"]["steps"])
    if resume is None and config.strategy in ("linear_probe", "lp_ft"):
        set_trainable(list(model.parameters()), False)
        set_trainable(list(model.get_classifier().parameters()), True)  # type: ignore[operator]
        probe_only = config.strategy == "linear_probe"
        extra["probe"] = _probe(
            run, config.epochs if probe_only else config.probe_epochs, probe_only
        )
        set_trainable(list(model.parameters()), True)
        if not probe_only and control.reason is None:
            run.checkpoint("probe", 0)
    if config.strategy != "linear_probe" and control.reason is None:
        _fine_tune(run)

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


def _fine_tune(run: _Run) -> None:
    """Train the whole network (gradual: from the top down) with augmentation."""
    model, config, data, device = run.model, run.config, run.data, run.device
    control, best, history = run.control, run.best, run.history
    amp_dtype, loss_fn, loader_kwargs = run.amp_dtype, run.loss_fn, run.loader_kwargs
    extra = run.extra
    train_set = data.train_set(config)
    generator = torch.Generator().manual_seed(config.seed)
    weights = None
    if extra["class_balance"] == "balanced_sampler":
        labels = np.asarray(data.labels)[data.train_idx]
        counts = np.bincount(labels, minlength=len(data.classes)).astype(float)
        weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    sampler = EpochSampler(len(train_set), generator, weights)
    batch_size = min(config.batch_size, len(train_set))
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=len(train_set) > batch_size,  # no 1-image batch for BatchNorm
        generator=generator,  # the workers' base seed: drawn from it each epoch
        **loader_kwargs,
    )
    val_loader = DataLoader(data.val_set(config), batch_size=config.batch_size * 2, **loader_kwargs)
    mult = config.effective_backbone_lr_mult
    optimizer = make_optimizer(
        config, param_groups(model, config.learning_rate, mult, config.effective_weight_decay)
    )
    scheduler = make_scheduler(config, optimizer, len(train_loader), config.epochs)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    mixing = batch_mixing(config, len(data.classes))
    stages = backbone_stages(model) if config.strategy == "gradual" else []
    train_model: nn.Module = torch.compile(model) if config.compile else model  # type: ignore[assignment]

    control.on_phase("training")
    plan: LrPlan | None = getattr(scheduler, "lr_lambdas", [None])[0]
    planned = config.epochs
    epoch = 0
    resume = run.resume
    partial: dict[str, Any] | None = None
    if resume is not None and resume["phase"] == "fine_tune":
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        generator.set_state(resume["loader_rng"])
        torch.set_rng_state(resume["torch_rng"])
        epoch, planned = int(resume["epoch"]), int(resume["planned"])
        partial = resume.get("partial")  # stopped in the middle of the next epoch
    started, first_epoch = time.monotonic(), epoch
    while epoch < planned:
        epoch += 1
        if stages:
            unfrozen = math.ceil(epoch * len(stages) / planned)
            for i, params in enumerate(stages):
                set_trainable(params, i >= len(stages) - unfrozen)
        lr = optimizer.param_groups[-1]["lr"]
        epoch_rng = generator.get_state()  # this epoch's order and worker seeds follow from it
        done = None
        if partial is not None:  # go on after the batches the checkpoint had trained on
            done = EpochStats(**partial)
            sampler.skip_next(done.steps * batch_size)
            partial = None
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
            resume_from=done,
        )
        if stats.stopped and control.reason == "callback":
            if control.checkpoint_on_stop():
                run.checkpoint(
                    "fine_tune",
                    epoch - 1,  # epochs complete; `partial` is how far this one got
                    planned=planned,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler else None,
                    loader_rng=epoch_rng,
                    partial=asdict(stats),
                )
            break
        logits, targets = predict(train_model, val_loader, device, amp_dtype)
        report = classification_report(logits, targets, data.classes) if len(targets) else {}
        metrics = _epoch_metrics(epoch, stats, report, lr, "fine_tune")
        history.append(metrics)
        es = config.early_stopping
        best.update(metrics, model, es.min_delta if es else 0.0)
        log.info("epoch %d/%d %s", epoch, config.epochs, metrics)
        control.on_epoch_end(metrics, best.metrics)
        run.checkpoint(
            "fine_tune",
            epoch,
            planned=planned,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler else None,
            loader_rng=generator.get_state(),
        )
        if stats.stopped:
            break
        if _early_stop(config, best):
            control.reason = "early_stopping"
            break
        if control.deadline is not None and isinstance(plan, LrPlan):
            # Fit the schedule to the epochs the time budget leaves room for.
            per_epoch = (time.monotonic() - started) / (epoch - first_epoch)
            fits = epoch + int(max(0.0, control.deadline - time.monotonic()) // per_epoch)
            if fits < planned:
                planned = fits  # >= epoch: at worst, this epoch was the last
                plan.replan(planned)
                extra["epochs_fitted_to_budget"] = planned
    set_trainable(list(model.parameters()), True)


def _final_report(
    model: nn.Module, config: JobSpec, data: PreparedData, loader_kwargs: dict[str, Any]
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

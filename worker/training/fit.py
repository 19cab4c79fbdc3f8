"""fit(config, data, callbacks) -> FitResult. Pure PyTorch: no Celery, no DB, no HTTP.

`fit` builds the model and the run, hands it to the job's strategy (`strategies.py`), then
restores the best epoch's weights and evaluates them. The pieces: `runtime.py` (device,
precision, loaders), `loop.py` (one epoch, inference), `probe.py` and `finetune.py` (the two
phases), `selection.py` (the epochs' record, best epoch, early stopping), `control.py` (stop
requests, time budget), `checkpoint.py` (resume snapshots).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from core.jobspec import JobSpec
from worker.training import multilabel
from worker.training.backbones import create_model
from worker.training.callbacks import Callbacks
from worker.training.checkpoint import resumed_from
from worker.training.control import Control, Interrupted
from worker.training.data import PreparedData
from worker.training.loop import predict
from worker.training.metrics import evaluate
from worker.training.optim import class_weights
from worker.training.probe import refit_probe
from worker.training.run import Run
from worker.training.runtime import Runtime, amp_dtype_for, seed_everything
from worker.training.selection import EpochRecord
from worker.training.strategies import STRATEGIES
from worker.training.weights import WeightsSource

__all__ = ["FitResult", "amp_dtype_for", "fit"]  # amp_dtype_for: benchmarks import it here


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
    # Kept for what follows training (`label_issues.py`), never serialised: the probe's
    # cached features (`Run.probe_cache`) and the validation (logits, targets).
    probe_cache: Any = None
    val_logits: tuple[torch.Tensor, torch.Tensor] | None = None
    # The delivered model's held-out validation (logits, targets): `val_logits`, except for
    # a probe refitted on train + validation (its logits before the refit). A search
    # compares trials by them.
    held_out_logits: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def stopped(self) -> bool:
        return self.stopped_reason == "callback"


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
    deadline: float | None = None,
) -> FitResult:
    """Train `config.backbone` on `data` by `config.strategy`; with `resume` (a checkpoint
    from `callbacks.on_checkpoint`), go on from where that attempt left off. `deadline`
    (time.monotonic): when `config.time_budget_seconds` runs out, counted by the caller
    from the job's start; without it the budget counts from this call."""
    control = Control(callbacks or Callbacks(), config.time_budget_seconds, deadline)
    runtime = Runtime.on(device or spec_device(config), num_workers, config.backbone)
    if runtime.distributed:  # one rank of `distributed.py`: the ranks stop and plan alike
        control.agree = runtime.agree
    seed_everything(config.seed)
    model = create_model(config.backbone, len(data.classes), pretrained, weights)
    # Channels-last on every device: a lite0 training step 1.4-1.7x faster on a 2-core CPU
    # (oneDNN), 1.45x on an H200 (BENCHMARKS.md, "Channels-last on the CPU", "GPU");
    # handed back contiguous.
    model = model.to(runtime.device).to(memory_format=torch.channels_last)
    balance, loss_fn = _loss(config, data, runtime.device)
    run = Run(
        config,
        data,
        model,
        runtime,
        loss_fn,
        control,
        EpochRecord(config, control, data.multilabel),
        {"class_balance": balance, "strategy": config.strategy},
    )
    if data.multilabel:
        run.extra.update(task="multi-label", selection_metric=run.record.best.metric)
    if resume is not None:
        # Pick up where a lost attempt left off: its weights, history and best epoch.
        model.load_state_dict(resume["model"])
        run.record.restore(resume)
        run.extra.update(resume["extra"])
        run.extra["resumed_from"] = resumed_from(resume)
    try:
        STRATEGIES[config.strategy](run, resume)
        abandoned = False
    except Interrupted:  # the caller stopped it during the probe's feature extraction
        control.reason, abandoned = "callback", True

    best = run.record.best
    if best.state is not None:
        model.load_state_dict(best.state)
    refit = refit_probe(run)
    if refit is not None:
        run.extra["refit"] = refit
    # Evaluate where the model trained (a GPU worker's report must not crawl on its CPU),
    # then hand back a CPU model: export and delivery read it there.
    # One rank of a distributed fit: rank 0 reports (and hands the model back) for all.
    # Nothing to report (nor to keep) when the first pass was abandoned: no epoch ended.
    reports = runtime.rank == 0 and not (abandoned and not run.record.history)
    report = final_report(model.eval(), run) if reports else {}
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return FitResult(
        model=model,
        classes=data.classes,
        history=run.record.history,
        best=best.metrics,
        report=report,
        stopped_reason=control.reason,
        device=str(runtime.device),
        extra=run.extra,
        probe_cache=run.probe_cache,
        val_logits=run.val_outputs,
        held_out_logits=run.probe_val_outputs if refit is not None else run.val_outputs,
    )


def spec_device(config: JobSpec) -> torch.device | None:
    """The device the job asked for (None: auto, the worker's best). `cpu` holds even on a
    GPU host; `gpu` on a host without CUDA fails the job instead of crawling on the CPU."""
    if config.device == "cpu":
        return torch.device("cpu")
    if config.device == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("the job asked for device 'gpu' and this worker has no CUDA")
        return torch.device("cuda")
    return None


def _loss(config: JobSpec, data: PreparedData, device: torch.device) -> tuple[str, nn.Module]:
    """The class-balance mode in effect and the loss (class-weighted when imbalanced)."""
    train_labels = np.asarray(data.labels)[data.train_idx]
    if len(train_labels) == 0:
        raise ValueError("the training split is empty")
    if data.multilabel:
        return _multilabel_loss(config, data, device)
    balance, weights_per_class = class_weights(config, train_labels, len(data.classes))
    loss_fn = nn.CrossEntropyLoss(
        weight=weights_per_class.to(device) if weights_per_class is not None else None,
        label_smoothing=config.label_smoothing,
    )
    return balance, loss_fn


def _multilabel_loss(
    config: JobSpec, data: PreparedData, device: torch.device
) -> tuple[str, nn.Module]:
    """BCE with logits. `weighted_loss` (or `auto` when the classes' positive counts differ
    more than `imbalance_threshold` times) weighs each class's positives by its
    negatives/positives (clipped); `balanced_sampler` weighs images instead (finetune.py)."""
    assert data.targets is not None
    train = data.targets[data.train_idx]
    mode = config.class_balance
    if mode == "auto":
        pos = multilabel.positive_counts(train)
        ratio = pos.max() / max(pos.min(), 1.0)
        mode = "weighted_loss" if ratio > config.imbalance_threshold else "none"
    pos_weight = None
    if mode == "weighted_loss":
        pos_weight = torch.as_tensor(multilabel.pos_weights(train)).to(device)
    return mode, multilabel.bce_loss(pos_weight, config.label_smoothing).to(device)


def final_report(model: nn.Module, run: Run) -> dict[str, Any]:
    """Full evaluation of the chosen model on the validation and test splits, on the
    training device (a GPU worker's report must not crawl on its CPU) in full precision:
    the report describes the model as delivered (fp32 weights, ONNX), and bf16 autocast
    changed 7% of the predictions of a digits model on an H200 (BENCHMARKS.md, "GPU").
    Logits gathered on the CPU.
    Multi-label: each class's threshold is first tuned on the validation split (best F1,
    `multilabel.tune_thresholds`), recorded in `run.extra["thresholds"]`, and both splits
    are reported at those thresholds (the validation figures are thus optimistic; the
    test split's are not)."""
    config, data = run.config, run.data
    report: dict[str, Any] = {}
    thresholds = None
    for name, dataset in (("validation", data.val_set(config)), ("test", data.test_set(config))):
        if dataset is None or len(dataset) == 0:
            continue
        rt = run.runtime
        loader = rt.loader(dataset, config.batch_size * 2)
        logits, targets = predict(model, loader, rt.device, None)
        if name == "validation":
            run.val_outputs = (logits, targets)
        if data.multilabel and name == "validation":
            thresholds = multilabel.tune_thresholds(logits.sigmoid(), targets)
        report[name] = evaluate(logits, targets, data.classes, data.multilabel, thresholds)
    if data.multilabel:
        if thresholds is None:  # no validation image to tune on: one half for every class
            thresholds = np.full(len(data.classes), multilabel.DEFAULT_THRESHOLD)
        run.extra["thresholds"] = [float(t) for t in thresholds]
    if "refit" in run.extra and "validation" in report:
        report["validation"]["held_out"] = False  # the refitted head has seen these images
    return report

"""The linear probe: the backbone frozen, its features computed once and cached, and only
the head trained on them (an epoch is a pass over cached features: seconds, not minutes)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from worker.training.callbacks import Callbacks
from worker.training.loop import predict, train_one_epoch
from worker.training.metrics import classification_report
from worker.training.optim import LrPlan, head_optimizer, set_trainable
from worker.training.run import Run
from worker.training.selection import epoch_metrics


def extract_features(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features, train labels, val features, val labels): pooled pre-logits features
    of the un-augmented images, on the CPU."""
    config, data, rt = run.config, run.data, run.runtime
    batch_size = config.batch_size * 2
    train_x, train_y = predict(
        run.model,
        rt.loader(data.eval_train_set(config), batch_size),
        rt.device,
        rt.amp_dtype,
        features=True,
    )
    val_x, val_y = predict(
        run.model,
        rt.loader(data.val_set(config), batch_size),
        rt.device,
        rt.amp_dtype,
        features=True,
    )
    return train_x, train_y, val_x, val_y


def train_probe(run: Run, epochs: int, report_epochs: bool) -> dict[str, Any]:
    """Train only the head, `epochs` passes over the cached features. With `report_epochs`
    (linear_probe) each head epoch is an epoch of the job; otherwise (lp_ft) the probed
    model is recorded once, as epoch 0. Returns what `fit` reports as `extra["probe"]`."""
    config, model, control, device = run.config, run.model, run.control, run.runtime.device
    set_trainable(list(model.parameters()), False)
    head = model.get_classifier()  # type: ignore[operator]
    set_trainable(list(head.parameters()), True)
    control.on_phase("extracting features")
    t0 = time.perf_counter()
    train_x, train_y, val_x, val_y = extract_features(run)
    extract_seconds = time.perf_counter() - t0

    optimizer = head_optimizer(head, config)
    loader = DataLoader(
        TensorDataset(train_x, train_y),
        batch_size=max(config.batch_size, 64),
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    plan = LrPlan("cosine", len(loader), epochs, max(1, len(loader) * epochs // 20))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan)
    val_x = val_x.to(device)
    # Progress and stop requests are taken per head epoch (below), never within one.
    quiet = Callbacks()
    control.on_phase("probing")
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        stats = train_one_epoch(
            head, loader, optimizer, scheduler, run.loss_fn, device, epoch, quiet
        )
        head.eval()
        with torch.no_grad():
            val_logits = head(val_x)
        report = (
            classification_report(val_logits.cpu(), val_y, run.data.classes) if len(val_y) else {}
        )
        # The epoch's time includes its validation; no loader time: features are in memory.
        stats = replace(stats, seconds=time.perf_counter() - start, data_seconds=0.0)
        if report_epochs:
            control.on_step(epoch, 1, 1)
            lr = optimizer.param_groups[0]["lr"]
            run.record.add(epoch_metrics(epoch, stats, report, lr, "probe"), model)
            if run.record.early_stop():
                control.reason = "early_stopping"
                break
        if control.should_stop():
            break
    if not report_epochs:
        # The probed model is a candidate too: fine-tuning must beat it to replace it.
        lr = optimizer.param_groups[0]["lr"]
        run.record.add(epoch_metrics(0, stats, report, lr, "probe"), model)
    set_trainable(list(model.parameters()), True)
    return {
        "epochs": epochs,
        "feature_seconds": round(extract_seconds, 3),
        "val_accuracy": report.get("top1_accuracy"),
        "val_loss": report.get("loss"),
    }

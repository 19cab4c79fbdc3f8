"""The linear probe: the backbone frozen, its features computed once and cached, and only
the head fitted on them (`linear.py`: seconds, not minutes)."""

from __future__ import annotations

import time
from typing import Any

import torch

from worker.training.linear import fit_linear
from worker.training.loop import EpochStats, predict
from worker.training.metrics import evaluate
from worker.training.multilabel import subset_correct
from worker.training.run import Run
from worker.training.selection import epoch_metrics


def extract_features(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features, train labels, val features, val labels): pooled pre-logits features
    of the un-augmented images, on the CPU. The caller's stop (not the budget) interrupts
    it between batches (`Interrupted`)."""
    config, data, rt = run.config, run.data, run.runtime
    batch_size = config.batch_size * 2
    train_x, train_y = predict(
        run.model,
        rt.loader(data.eval_train_set(config), batch_size),
        rt.device,
        rt.amp_dtype,
        features=True,
        stop=run.control.should_abandon,
    )
    val_x, val_y = predict(
        run.model,
        rt.loader(data.val_set(config), batch_size),
        rt.device,
        rt.amp_dtype,
        features=True,
        stop=run.control.should_abandon,
    )
    return train_x, train_y, val_x, val_y


def train_probe(run: Run, report_epochs: bool) -> dict[str, Any]:
    """Fit the head on the cached features (`linear.fit_linear`: logistic regression, its
    penalty cross-validated; one per class, by BCE, for a multi-label run). With
    `report_epochs` (linear_probe) the probe is the job's epoch 1; otherwise (lp_ft) the
    probed model is recorded as epoch 0, a candidate that fine-tuning must beat. Never cut
    by the time budget: on cached features it takes seconds, and it is the model a budget
    that allows nothing more delivers. Returns what `fit` reports as `extra["probe"]`."""
    config, model, control, device = run.config, run.model, run.control, run.runtime.device
    head = model.get_classifier()  # type: ignore[operator]
    control.on_phase("extracting features")
    t0 = time.perf_counter()
    # Distributed: rank 0 extracts, every rank fits the same head on the same features.
    train_x, train_y, val_x, val_y = run.runtime.from_rank0(lambda: extract_features(run))
    extract_seconds = time.perf_counter() - t0

    control.on_phase("probing")
    start = time.perf_counter()
    solved = fit_linear(
        train_x.to(device),
        train_y.to(device),
        len(run.data.classes),
        run.loss_fn,
        seed=config.seed,
        max_iter=config.probe_epochs,
    )
    solved.load_into(head)
    run.probe_cache = (train_x, train_y, val_x, val_y, solved.penalty)
    multilabel = run.data.multilabel
    with torch.no_grad():
        train_logits = solved.logits(train_x.to(device))
        train_loss = float(run.loss_fn(train_logits, train_y.to(device)))
        if multilabel:  # subset accuracy at 0.5, as train_one_epoch counts it
            correct = subset_correct(train_logits, train_y.to(device))
            train_acc = float(correct) / max(len(train_y), 1)
        else:
            train_acc = float((train_logits.argmax(1) == train_y.to(device)).float().mean())
        val_logits = solved.logits(val_x.to(device)).cpu()
    run.probe_val_outputs = (val_logits, val_y.cpu())
    report = evaluate(val_logits, val_y, run.data.classes, multilabel)
    probe_seconds = time.perf_counter() - start
    stats = EpochStats(train_loss, train_acc, len(train_y), probe_seconds, 0.0, steps=1)
    epoch = 1 if report_epochs else 0
    if report_epochs:
        control.on_step(1, 1, 1)
    run.record.add(epoch_metrics(epoch, stats, report, 0.0, "probe"), model)
    return {
        **solved.summary(),
        "feature_seconds": round(extract_seconds, 3),
        "probe_seconds": round(probe_seconds, 3),
        "val_accuracy": report.get("subset_accuracy" if multilabel else "top1_accuracy"),
        "val_loss": report.get("loss"),
        **({"val_map": report.get("map")} if multilabel else {}),
    }


def refit_probe(run: Run) -> dict[str, Any] | None:
    """When the probe is the model delivered (and `refit` is on): its head fitted again on
    the training and validation features together, with the penalty cross-validation chose.
    Seconds on cached features, and every labelled image counts; the validation figures of
    the final report are then no longer held out (the report says so). Not for multi-label
    runs, whose thresholds are tuned on the validation split."""
    best = run.record.best.metrics
    if (
        not run.config.refit
        or run.probe_cache is None
        or best.get("phase") != "probe"
        or run.data.multilabel
    ):
        return None
    train_x, train_y, val_x, val_y, penalty = run.probe_cache
    if len(val_y) == 0:
        return None
    device = run.runtime.device
    solved = fit_linear(
        torch.cat([train_x, val_x]).to(device),
        torch.cat([train_y, val_y]).to(device),
        len(run.data.classes),
        run.loss_fn,
        max_iter=run.config.probe_epochs,
        penalties=(penalty,),
    )
    solved.load_into(run.model.get_classifier())  # type: ignore[operator]
    return {"on": "train+validation", "images": int(len(train_y) + len(val_y)), "penalty": penalty}

"""Fine-tuning: the whole network trains on augmented images, epoch by epoch, with a
checkpoint after each (and, on a shutdown, in the middle of one)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from core.jobspec import JobSpec
from worker.training.augment import batch_mixing
from worker.training.loop import EpochSampler, EpochStats, predict, train_one_epoch
from worker.training.metrics import evaluate
from worker.training.multilabel import sample_weights
from worker.training.optim import (
    LrPlan,
    layer_decayed_groups,
    make_optimizer,
    make_scheduler,
    param_groups,
    set_trainable,
)
from worker.training.refit import (
    BACKOFF_MAX_EPOCHS,
    WarmupRefit,
    estimated_val_seconds,
    keep_back,
    refit_to_budget,
)
from worker.training.run import Run
from worker.training.runtime import RankAugmented, RankStream
from worker.training.selection import epoch_metrics

log = logging.getLogger(__name__)
BACKOFF_DROP = 0.02  # an epoch this far below the best so far halves the learning rate


def train_loaders(
    run: Run, stream: RankStream | None = None
) -> tuple[DataLoader, DataLoader, EpochSampler, torch.Generator]:
    """The augmented training images in a seeded order (weighted with `balanced_sampler`),
    and the same order of the same images without augmentation (as the probe saw them:
    `clean_epochs`); one sampler and generator, so a checkpoint's order holds for both.
    `stream`: a rank's own augmentation draws, where no loader workers make them."""
    config, data = run.config, run.data
    cached = data.train_set(config)
    train_set: Dataset[Any] = cached
    if stream is not None and not run.runtime.loader_kwargs.get("num_workers"):
        train_set = RankAugmented(train_set, stream)
    generator = torch.Generator().manual_seed(config.seed)
    weights = None
    if run.extra["class_balance"] == "balanced_sampler" and data.targets is not None:
        # Multi-label: an image weighs as its rarest class.
        weights = torch.as_tensor(sample_weights(data.targets[data.train_idx]), dtype=torch.double)
    elif run.extra["class_balance"] == "balanced_sampler":
        labels = np.asarray(data.labels)[data.train_idx]
        counts = np.bincount(labels, minlength=len(data.classes)).astype(float)
        weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    rt = run.runtime  # distributed: this rank's share of each epoch, `batch_size` a rank
    sampler = EpochSampler(len(cached), generator, weights, rt.rank, rt.world_size)
    batch_size = min(config.batch_size, len(sampler))
    loader, plain = (
        rt.loader(
            images,
            batch_size,
            sampler=sampler,
            drop_last=len(sampler) > batch_size,  # no 1-image batch for BatchNorm
            generator=generator,  # the workers' base seed: drawn from it each epoch
            **extra,
        )
        for images, extra in (
            (train_set, {}),
            # Used for one epoch: its worker processes must not outlive it.
            (data.eval_train_set(config), {"persistent_workers": False}),
        )
    )
    return loader, plain, sampler, generator


def epoch_steps(plan: LrPlan, epoch: int) -> Callable[[], int]:
    """The steps epoch `epoch` takes, asked as it runs: the warm-up's re-fit may end it."""
    return lambda: plan.steps_in_epoch(epoch)


def unfreeze_from_the_top(stages: list[list[nn.Parameter]], epoch: int, planned: int) -> None:
    """`gradual`: a stage more each epoch, spread so the whole backbone trains by the last."""
    unfrozen = math.ceil(epoch * len(stages) / planned)
    for i, params in enumerate(stages):
        set_trainable(params, i >= len(stages) - unfrozen)


def restore_training(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    generator: torch.Generator,
) -> tuple[int, int, dict[str, Any] | None]:
    """Load a fine-tuning checkpoint's training states; return (epochs done, epochs planned,
    how far the next epoch got when the checkpoint was written mid-epoch)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    generator.set_state(state["loader_rng"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), int(state["planned"]), state.get("partial")


def clean_epochs(run: Run) -> int:
    """lp_ft: the first fine-tuning epoch trains on the images as the probe saw them (no
    augmentation, no mixing). The probed head was fitted to features of those images;
    augmented ones move the backbone off them, and at 1e-4 the first epoch still fell
    1.4 points below the probe on 8-px digits at 32 px (0.913 -> 0.899; 0.910 without
    augmentation). Later epochs are augmented as configured."""
    return 1 if run.config.strategy == "lp_ft" else 0  # a resumed run too: the same order


def regressed(run: Run, metrics: dict[str, Any]) -> bool:
    """This epoch's selection metric fell more than `BACKOFF_DROP` below the best epoch's
    (the probe's, at first): the learning rate is too high for this dataset. Not asked of
    an lp_ft plan (`config.epochs`, what its rate was chosen for, not the epochs a budget
    re-fit leaves) of more than `BACKOFF_MAX_EPOCHS` epochs: it has time to recover."""
    config = run.config
    if config.strategy == "lp_ft" and config.epochs > BACKOFF_MAX_EPOCHS:
        return False
    best = run.record.best
    if not best.maximize or best.metrics.get("epoch") == metrics["epoch"]:
        return False
    now, top = metrics.get(best.metric), best.metrics.get(best.metric)
    return now is not None and top is not None and now < top - BACKOFF_DROP


def back_off(
    run: Run, plan: LrPlan, optimizer: torch.optim.Optimizer, model: nn.Module, ema: Any, epoch: int
) -> None:
    """Go back to the best weights so far at half the learning rate (recorded in
    `extra["lr_backoffs"]`). On a dataset whose probe is already strong, fine-tuning at
    the default rate first loses what the probe had; on one whose probe is weak the same
    rate is what it takes to improve, and no backoff happens."""
    best = run.record.best
    assert best.state is not None
    model.load_state_dict(best.state)
    run.runtime.same_weights(model)  # distributed: each rank's best was its own copy
    if ema is not None:
        ema.module.load_state_dict(best.state)
        run.runtime.same_weights(ema.module)
    # The optimizer's moments are kept: fresh Adam moments make the first steps full-size
    # (lr per weight) and blew up a 32-px run that the backoff was meant to calm.
    plan.scale *= 0.5
    run.extra.setdefault("lr_backoffs", []).append(
        {"after_epoch": epoch, "back_to_epoch": best.metrics.get("epoch"), "lr_scale": plan.scale}
    )
    log.info(
        "epoch %d regressed: back to epoch %s at lr x%g",
        epoch,
        best.metrics.get("epoch"),
        plan.scale,
    )


def weight_average(config: JobSpec, model: nn.Module, steps_per_epoch: int) -> Any:
    """timm's ModelEmaV3 of `model`, or None (`ema: false`). Its horizon is about half an
    epoch, so the averaged model is never far behind on the short runs a time budget
    allows, and it starts from the probed model."""
    if not config.effective_ema:
        return None
    from timm.utils import ModelEmaV3

    horizon = max(2.0, steps_per_epoch / 2)
    return ModelEmaV3(model, decay=1.0 - 1.0 / horizon)


def fine_tune(
    run: Run, resume: dict[str, Any] | None, stages: list[list[nn.Parameter]] | None = None
) -> None:
    """Train the whole network; with `stages` (gradual), unfrozen from the top down."""
    config, data, model, rt, control = run.config, run.data, run.model, run.runtime, run.control
    stream = RankStream(rt.rank) if rt.distributed else None  # each rank augments its own way
    loader, plain_loader, sampler, generator = train_loaders(run, stream)
    clean = clean_epochs(run)
    if clean:
        run.extra["unaugmented_epochs"] = clean
    val_loader = rt.loader(data.val_set(config), config.batch_size * 2)
    mult, wd = config.effective_backbone_lr_mult, config.effective_weight_decay
    groups = (
        layer_decayed_groups(model, config.learning_rate, mult, wd, config.layer_decay)
        if config.layer_decay is not None and config.layer_decay < 1.0
        else param_groups(model, config.learning_rate, mult, wd)
    )
    optimizer = make_optimizer(config, groups)
    scheduler = make_scheduler(config, optimizer, len(loader), config.epochs)
    scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
    mixing = batch_mixing(config, len(data.classes))
    if mixing is not None and data.multilabel:
        # torchvision's MixUp/CutMix take class indices, not multi-hot rows.
        log.info("MixUp/CutMix are off: this is a multi-label dataset")
        run.extra["batch_mixing"] = "off (multi-label)"
        mixing = None
    if mixing is not None and stream is not None:
        mixing = stream.wrap(mixing)
    train_model = rt.parallel(model, find_unused=stages is not None)  # DDP when distributed
    if config.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    ema = weight_average(config, model, len(loader))
    # What is validated, selected and kept: the weights' moving average when there is one.
    # Rank 0 validates alone: not through DDP, whose forward is a collective.
    eval_model: nn.Module = (
        ema.module if ema is not None else model if rt.distributed else train_model
    )

    def training_state(planned: int, loader_rng: torch.Tensor, **more: Any) -> dict[str, Any]:
        return {
            "planned": planned,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "loader_rng": loader_rng,
            "ema": ema.module.state_dict() if ema is not None else None,
            **more,
        }

    control.on_phase("training")
    plan: LrPlan | None = getattr(scheduler, "lr_lambdas", [None])[0]
    epoch, planned, partial = 0, config.epochs, None
    if resume is not None and resume["phase"] == "fine_tune":
        epoch, planned, partial = restore_training(resume, optimizer, scheduler, scaler, generator)
        # A budget re-fit before the restart (the plan is the scheduler's): progress counts it.
        told = plan.planned_epochs if isinstance(plan, LrPlan) else planned
        if told != config.epochs:
            control.on_plan(told)
        if ema is not None and resume.get("ema") is not None:
            ema.module.load_state_dict(resume["ema"])
    started, first_epoch = time.monotonic(), epoch
    if control.deadline is not None:
        # Until a validation is timed: the recipe's measured speed, else none.
        keep_back(run, estimated_val_seconds(run) or 0.0)
        late = time.monotonic() > control.deadline - control.stop_margin
        if control.agree is not None:  # distributed: every rank trains, or none
            late = control.agree([float(late)], "max")[0] > 0
        # Not one step fits before what follows training: the probe (or the epochs of an
        # earlier attempt) is the model. With no model yet (`full`), one step still runs.
        if late and run.record.best.state is not None:
            log.info("time budget: no room left for fine-tuning")
            control.reason, planned = "time_budget", epoch
    warmup_refit = (
        WarmupRefit(run, plan, scheduler.last_epoch) if isinstance(plan, LrPlan) else None
    )

    def after_step() -> None:
        if ema is not None:
            ema.update(model)
        if warmup_refit is not None:
            warmup_refit(scheduler.last_epoch)

    saving = 0.0  # seconds the last checkpoint took: a shorter epoch pays it in full too
    while epoch < planned:
        epoch += 1
        if stages:
            unfreeze_from_the_top(stages, epoch, planned)
        lr = optimizer.param_groups[-1]["lr"]
        epoch_rng = generator.get_state()  # this epoch's order and worker seeds follow from it
        if stream is not None:
            stream.start(config.seed, epoch)
        done = None
        if partial is not None:  # go on after the batches the checkpoint had trained on
            done = EpochStats(**partial)
            sampler.skip_next(done.steps * (loader.batch_size or 1))
            partial = None
        stats = train_one_epoch(
            train_model,
            plain_loader if epoch <= clean else loader,
            optimizer,
            scheduler,
            run.loss_fn,
            rt.device,
            epoch,
            control,
            rt.amp_dtype,
            scaler,
            None if epoch <= clean else mixing,
            config.grad_clip_norm,
            freeze_norm_stats=config.effective_freeze_norm_stats,
            resume_from=done,
            after_step=after_step,
            # A re-fit's last epoch may be a part of one.
            max_steps=epoch_steps(plan, epoch) if isinstance(plan, LrPlan) else None,
        )
        if isinstance(plan, LrPlan):  # a re-fit within the epoch (WarmupRefit) may grow it
            planned = plan.epochs
        if stats.stopped and control.reason == "callback":
            if control.checkpoint_on_stop():
                # Epochs complete so far; `partial` is how far this one got.
                state = training_state(planned, epoch_rng, partial=asdict(stats))
                run.checkpoint("fine_tune", epoch - 1, **state)
            break
        val_start = time.monotonic()
        # Distributed: rank 0 validates, so every rank selects, backs off and stops alike.
        logits, targets = rt.from_rank0(
            lambda: predict(eval_model, val_loader, rt.device, rt.amp_dtype)
        )
        # The final evaluation (validation + test) and export come after the last epoch.
        val_seconds = time.monotonic() - val_start
        keep_back(run, val_seconds, saving)
        report = evaluate(logits, targets, data.classes, data.multilabel)
        metrics = epoch_metrics(epoch, stats, report, lr, "fine_tune")
        es = config.early_stopping
        run.record.add(
            metrics, ema.module if ema is not None else model, es.min_delta if es else 0.0
        )
        log.info("epoch %d/%d %s", epoch, planned, metrics)
        if isinstance(plan, LrPlan) and regressed(run, metrics):
            back_off(run, plan, optimizer, model, ema, epoch)
        ends = stats.stopped or run.record.early_stop()
        if not ends and control.deadline is not None and isinstance(plan, LrPlan):
            # Fit the schedule to the epochs the time budget leaves room for (before the
            # checkpoint: a restart goes on with the re-fitted plan).
            per_epoch = (time.monotonic() - started) / (epoch - first_epoch)
            planned = refit_to_budget(
                run, plan, epoch, per_epoch, scheduler.last_epoch, val_seconds + saving
            )
        saving = time.monotonic()
        run.checkpoint("fine_tune", epoch, **training_state(planned, generator.get_state()))
        saving = time.monotonic() - saving
        if stats.stopped:
            break
        if run.record.early_stop():
            control.reason = "early_stopping"
            break
    set_trainable(list(model.parameters()), True)

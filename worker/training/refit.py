"""How many epochs a fine-tuning schedule runs under a time budget: re-fitted to what the
measured speed leaves room for, after each epoch and as a warm-up that ends inside an
epoch ends."""

from __future__ import annotations

import logging
import time

from core.jobspec import JobSpec
from worker.training.optim import LrPlan
from worker.training.run import Run

log = logging.getLogger(__name__)

# What a job pays after `fit` returns (`delivery_seconds`), measured for lite0 at 64 px on
# 1,438 digits on a 2-core CPU (BENCHMARKS.md, "A time budget as the user reads it"): the
# model files (TorchScript trace 1.2 s, ONNX export 1.1 s, writing them), the ONNX checks
# (onnxruntime on up to `CHECKED_IMAGES` validation images, again mirrored for the flip
# check, PyTorch on about 80 of them: 1.4 s), and the label issues (cross-validated probes
# on the cached features of every labelled image: 2.0 s).
EXPORT_SECONDS = 3.0
CHECKED_IMAGES = 256  # export.export_checks' limit
LABEL_ISSUES_SECONDS, LABEL_ISSUES_PER_IMAGE = 0.5, 0.001

# lp_ft plans of more fine-tuning epochs than this never back off: they have room to climb
# out of the dip of their first epochs, and the recipe gives them a higher rate (3e-4,
# recipe.LP_FT_LONG_LEARNING_RATE). On 240 degraded digits, 8 epochs at 128 px, the
# backoff sent every run back to the probe (test 0.43 at 1e-4 and at 1e-3); without it
# 3e-4 reached 0.60 and 0.67 (1e-4 stayed at 0.43 and 0.45: the rate matters too). The
# best epoch (the probe's included) is still what is kept, so a fine-tune that never
# recovers delivers the probe. `full` and `gradual` keep the backoff (not measured).
BACKOFF_MAX_EPOCHS = 3
EPOCHS_CAP = 30  # fine-tuning epochs the auto recipe never plans, nor a budget re-fit grows past
# A schedule grows only with room for this much more per epoch than measured: an epoch
# the deadline cuts short ends the run at a learning rate the cosine never brought down.
GROW_MARGIN = 1.05
# After the warm-up a schedule grows only while at most this share of its cosine's decay is
# done (the rate at least half its peak): epochs added later would train at a rate the
# decay has almost brought to zero (at its end, exactly zero).
GROW_UNTIL_DECAYED = 0.5
# The same at the warm-up's end inside the first epoch (`WarmupRefit`), where the epoch's
# checkpoint and validation are estimated, not timed.
WARMUP_GROW_MARGIN = 1.10


def delivery_seconds(n_val: int, n_labelled: int, per_image: float) -> float:
    """Seconds a job spends after training and its final evaluation, estimated: exporting
    and checking the model (`per_image`: seconds of inference an image on this device) and
    finding the label issues of its `n_labelled` training and validation images."""
    checked = min(n_val, CHECKED_IMAGES)
    export = EXPORT_SECONDS + (2 * checked + min(checked, 80)) * per_image
    return export + LABEL_ISSUES_SECONDS + LABEL_ISSUES_PER_IMAGE * n_labelled


def after_training(run: Run, val_seconds: float) -> float:
    """Seconds to keep back at the end of fine-tuning (`control.reserve`): the final
    evaluation (validation and test, at `val_seconds` for the validation images) and, when
    the caller delivers the model (`Callbacks.delivers_model`), its delivery. Without the
    probe's cached features (`full`, `gradual`, a run resumed past its probe) the label
    issues first pass every training and validation image through the model."""
    data = run.data
    n_val = max(1, len(data.val_idx))
    n_test = 0 if data.test_idx is None else len(data.test_idx)
    per_image = val_seconds / n_val
    final = per_image * (n_val + n_test)
    if not run.control.delivers_model:
        return final
    n_labelled = len(data.train_idx) + n_val
    features = n_labelled * per_image if getattr(run, "probe_cache", None) is None else 0.0
    return final + features + delivery_seconds(n_val, n_labelled, per_image)


def keep_back(run: Run, val_seconds: float, saving: float = 0.0) -> None:
    """Set what the deadline keeps back: epochs are planned only up to `deadline - reserve`,
    and a step ends training once only the reserve, its epoch's validation and checkpoint
    (`saving` seconds, as the last one took) are left."""
    control = run.control
    control.reserve = after_training(run, val_seconds)
    control.stop_margin = control.reserve + val_seconds + saving


def estimated_val_seconds(run: Run) -> float | None:
    """The validation pass at the inference speed the recipe measured (`plan["speed"]`), or
    None when there is no such measurement (a manual job)."""
    speed = (getattr(run.config, "plan", None) or {}).get("speed") or {}
    rate = speed.get("inference_images_per_second") or 0.0
    return len(run.data.val_idx) / rate if rate > 0 else None


def growth_cap(config: JobSpec) -> int | None:
    """How many epochs a budget re-fit may grow the schedule to, or None: never more than
    planned. Only epochs the auto recipe chose grow (`config.plan["choices"]`, the worker's
    JobConfig), never ones the user set, on the cosine schedule, not `gradual`'s; an lp_ft
    plan of at most `BACKOFF_MAX_EPOCHS` epochs only up to that: its rate and backoff were
    chosen for a short plan."""
    plan = getattr(config, "plan", None)
    if config.recipe != "auto" or not plan or "epochs" not in plan.get("choices", {}):
        return None
    if config.strategy == "gradual" or config.schedule != "cosine":
        # `gradual` spreads its unfreezing over the planned epochs (a longer plan would
        # freeze again what it had unfrozen); a step or one-cycle schedule has no warm-up
        # before which a longer plan changes nothing.
        return None
    if config.strategy == "lp_ft" and config.epochs <= BACKOFF_MAX_EPOCHS:
        return BACKOFF_MAX_EPOCHS
    return EPOCHS_CAP


def refit_to_budget(
    run: Run,
    plan: LrPlan,
    epoch: int,
    per_epoch: float,
    steps_done: int,
    fixed_seconds: float = 0.0,
) -> int:
    """The epochs the schedule plans from now on (the last one may be shorter: see
    `plan.planned_epochs`): fewer when the measured `per_epoch` says the plan would overrun
    the deadline, more (up to `growth_cap`) when the machine turned out faster than planning
    measured. Until the warm-up ends the cosine has not started, so the weights trained so
    far followed the longer schedule exactly; after it, the cosine goes on from the learning
    rate it has reached, over the steps the new plan leaves (`LrPlan.refit`: no jump), and
    grows only until half its decay is done (`GROW_UNTIL_DECAYED`). A
    first epoch slower than the rest (the first steps of each shape, the unaugmented epoch)
    may shrink the plan; later ones, timed on average, can grow it back: the warm-up's
    epochs alone under-used the budget by 10% (a 120-s job on 1,000 images ended at 108 s).
    Epochs the recipe chose end in the part of an epoch that fits (at least
    `control.MIN_LAST_EPOCH`; `fixed_seconds` of each epoch, its validation and checkpoint,
    are paid in full by a shorter one); a user's stay whole. The new plan goes in
    `extra["epochs_fitted_to_budget"]` and to `on_plan`."""
    control = run.control
    cap = growth_cap(run.config)
    fixed = fixed_seconds if cap is not None else None
    current = plan.planned_epochs
    fits = control.epochs_within_budget(epoch, current, per_epoch, fixed)
    # Never growth after a shorter epoch ran (it would sit in the middle of the longer run),
    # nor once most of the decay is done.
    whole = steps_done == epoch * plan.steps_per_epoch
    early = plan.schedule == "cosine" and plan.decayed(steps_done) <= GROW_UNTIL_DECAYED
    if fits >= current and cap is not None and cap > current and whole and early:
        fits = max(
            current, control.epochs_within_budget(epoch, cap, per_epoch * GROW_MARGIN, fixed)
        )
    if abs(fits - current) > 1e-6:
        plan.refit(steps_done, fits)
        run.extra["epochs_fitted_to_budget"] = round(plan.planned_epochs, 2)
        if abs(plan.planned_epochs - current) > 1e-9:  # not a part too small for a step
            control.on_plan(plan.planned_epochs)
        log.info("time budget: %g fine-tuning epochs planned instead of %g", fits, current)
    return plan.epochs


class WarmupRefit:
    """The re-fit at the last step of a warm-up that ends inside the first epoch: a 1-epoch
    plan warms up over half of it, so its epoch-end re-fit came after the cosine had
    started and it never grew (a 60-s job on 1,797 digits at 96 px ended at 43-47 s).
    Called after each optimizer step with the steps done; at the warm-up's last one it
    times the steps since the first it saw, adds the validation the planner's inference
    speed estimates (`plan["speed"]`: none has run yet) and `WARMUP_GROW_MARGIN` for what
    it cannot time (the checkpoint, validation's loader), and grows the plan as
    `refit_to_budget` would at an epoch's end. When not even the first epoch fits before
    training must stop, it ends that epoch (and its cosine) at the last step that does;
    otherwise it never shrinks the plan: the epoch-end re-fit does, from a measured epoch.
    Longer plans warm up over a whole epoch at least, and the epoch-end re-fit grows them."""

    def __init__(self, run: Run, plan: LrPlan, steps_done: int) -> None:
        self.run, self.plan = run, plan
        self.first: tuple[float, int] | None = None  # (time, steps) after the first step
        val_seconds = estimated_val_seconds(run)
        self.val_seconds = val_seconds or 0.0
        cap = growth_cap(run.config)
        self.active = (
            run.control.deadline is not None
            and cap is not None
            and cap > plan.planned_epochs
            and val_seconds is not None
            and steps_done < plan.warmup_steps < plan.steps_per_epoch
        )
        self.cap = cap or 0
        device = getattr(getattr(run, "runtime", None), "device", None)
        self.cuda = device is not None and device.type == "cuda"

    def _now(self) -> float:
        if self.cuda:  # steps are queued on the GPU: time them done
            import torch

            torch.cuda.synchronize()
        return time.monotonic()

    def __call__(self, steps_done: int) -> None:
        if not self.active:
            return
        if self.first is None:  # the first step pays one-time costs: timed from its end
            self.first = (self._now(), steps_done)
            return
        if steps_done < self.plan.warmup_steps:
            return
        self.active = False
        since, counted = self.first
        plan, control = self.plan, self.run.control
        if steps_done == counted or plan.steps_in_epoch(1) != plan.steps_per_epoch:
            return
        now = self._now()
        per_step = (now - since) / (steps_done - counted)
        left_in_epoch = (plan.steps_per_epoch - steps_done) * per_step
        per_epoch = (plan.steps_per_epoch * per_step + self.val_seconds) * WARMUP_GROW_MARGIN
        # What follows training, as the first validation will set it.
        control.reserve = max(control.reserve, after_training(self.run, self.val_seconds))
        current = plan.planned_epochs
        fits = control.epochs_within_budget(
            1, self.cap, per_epoch, self.val_seconds, ahead=left_in_epoch + self.val_seconds
        )
        if fits > current + 1e-6:
            plan.replan(fits)
            self.run.extra["epochs_fitted_to_budget"] = round(plan.planned_epochs, 2)
            control.on_plan(plan.planned_epochs)
            log.info("time budget: %g fine-tuning epochs planned at the warm-up's end", fits)
            return
        # The epoch itself does not fit before training must stop (`control.stop_margin`):
        # it ends, and the cosine with it, at the last step that does, not cut at a high
        # learning rate (the loop follows `plan.steps_in_epoch`).
        room = control.deadline - control.stop_margin - now if control.deadline else 0.0
        slow = max(per_step * WARMUP_GROW_MARGIN, 1e-9)  # a step later than timed: no cut
        last = steps_done + max(1, int(room / slow))
        if control.agree is not None:  # distributed: every rank ends the epoch at one step
            last = int(control.agree([float(last)], "min")[0])
        if last < plan.steps_in_epoch(1):
            log.info("time budget: the first epoch ends at step %d of %d", last, plan.total_steps)
            plan.replan(last / plan.steps_per_epoch)
            self.run.extra["epochs_fitted_to_budget"] = round(plan.planned_epochs, 2)
            control.on_plan(plan.planned_epochs)

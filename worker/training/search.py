"""Hyper-parameter search: `config.search.trials` runs of `fit` inside `budget_seconds` in all.

An in-memory Optuna study (TPE, seeded by the job's seed) samples the learning rate, weight
decay, input size, augmentation preset and epochs around the job's own values
(`search_space.py`; and lp_ft against the probe when the recipe chose a probe). The first
trial is the job's config as given (with the job's own time budget, when it has one and
that leaves the other trials room), so a search never delivers a worse validation accuracy
than the single run would have. Every other trial gets an equal share of what is left of
the budget (a trial that ends early leaves its time to the next ones); one that falls below
the median of the finished ones at the same epoch is pruned (stopped: its model so far is
kept as a candidate). Trials at the same input size share one image cache (`prepare_data`
is called once per size). The best trial by validation accuracy is the result, with every
trial listed in `extra["search"]`; a later trial replaces the best so far only when it is
better beyond chance on the same validation images (`_replaces`), so on a few hundred of
them a one-image lead never swaps the planned config for a luckier one. `budget_seconds`
counts from the job's start when the caller says when that was (`started`), planning
included; no trial starts with less time left than the quickest one took to its first
epoch and evaluation.

The config given must be concrete (the auto recipe already resolved): every trial runs its
fields as they are (`recipe="manual"`). A search is never resumed: an interrupted one
starts over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import optuna
import torch

from core.jobspec import JobSpec
from worker.training.callbacks import Callbacks
from worker.training.data import PreparedData
from worker.training.fit import FitResult, fit
from worker.training.search_space import MIN_FIT_SECONDS, SearchSpace, trial_params, trial_spec

log = logging.getLogger(__name__)

# Pruning: a trial is compared with the finished ones at the same epoch from its first
# fine-tuning epoch on (epoch 0, lp_ft's probe, is never pruned: fine-tuning may lift any
# probe), as soon as one trial has finished. Short trials have one to three epochs: a
# rule that waits for epoch 2 and two finished trials (Optuna's defaults) prunes nothing.
PRUNE_WARMUP_EPOCHS = 1
PRUNE_STARTUP_TRIALS = 1
# Kept for what follows the search inside its budget: the worker's export and upload of
# the best model (recipe.EXPORT_SECONDS measures them), at most this share of the budget.
EXPORT_SECONDS, EXPORT_SHARE = 5.0, 0.05
PHASE_CHARS = 40  # jobs.phase is a VARCHAR(40)

C = TypeVar("C", bound=JobSpec)

# Selection: a trial with a higher validation accuracy than the best so far replaces it only
# when, over the validation images the two classify differently, it is right on more of them
# by over SELECT_Z standard deviations of that difference under chance (McNemar's paired
# statistic: wins - losses > SELECT_Z * sqrt(wins + losses)). With 300 images one image is
# 0.3 points, and trials that fit the same data differ on tens of them.
SELECT_Z = 1.0


def default_pruner() -> optuna.pruners.BasePruner:
    """Optuna's median rule, from the first fine-tuning epoch and the first finished trial."""
    return optuna.pruners.MedianPruner(
        n_startup_trials=PRUNE_STARTUP_TRIALS, n_warmup_steps=PRUNE_WARMUP_EPOCHS
    )


class TrialCallbacks(Callbacks):
    """One trial's view of the job's callbacks: phases are labelled with the trial, steps go
    through (progress, and the reporter's cancel check), epochs are reported to Optuna for
    pruning but not to the job (its metrics become the best trial's, replayed at the end).
    Stops the trial when the job asks, when Optuna prunes it, or at the search's deadline."""

    def __init__(self, outer: Callbacks, trial: optuna.Trial, label: str, deadline: float):
        self.outer = outer
        self.trial = trial
        self.label = label
        self.deadline = deadline
        self.pruned = self.canceled = self.out_of_time = False
        self.first_epoch_at: float | None = None  # time.monotonic() of its first epoch's end

    def on_phase(self, phase: str) -> None:
        self.outer.on_phase(f"{self.label}: {phase}"[:PHASE_CHARS])

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.outer.on_step(epoch, step, steps_per_epoch)

    def on_epoch_end(self, metrics: dict[str, Any], best: dict[str, Any]) -> None:
        if self.first_epoch_at is None:
            self.first_epoch_at = time.monotonic()
        value = metrics.get("val_accuracy")
        if value is None:
            return
        self.trial.report(float(value), int(metrics["epoch"]))
        if self.trial.should_prune():
            self.pruned = True

    def should_stop(self) -> bool:
        if self.outer.should_stop():
            self.canceled = True
        if time.monotonic() > self.deadline:
            self.out_of_time = True
        return self.canceled or self.pruned or self.out_of_time


def _value(result: FitResult) -> float | None:
    """The trial's validation score, its best epoch's (None when no epoch finished):
    accuracy, or for a multi-label run the metric it selects by (mAP)."""
    metric = result.extra.get("selection_metric", "val_accuracy")
    if metric == "val_loss":  # the study maximises: never the loss
        metric = "val_accuracy"
    value = result.best.get(metric)
    return None if value is None else float(value)


def _better(value: float | None, than: float | None) -> bool:
    """Strictly better (ties go to the earlier trial); any value beats none."""
    return value is not None and (than is None or value > than)


def _right(result: FitResult) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(validation targets, which of them the delivered model got right, held out: a refitted
    probe's before its refit); None where a paired comparison does not apply (multi-label,
    no validation split)."""
    if result.held_out_logits is None or result.extra.get("task") == "multi-label":
        return None
    logits, targets = result.held_out_logits
    if logits.ndim != 2 or len(targets) == 0:
        return None
    return targets, logits.argmax(1) == targets


def _replaces(value: float | None, result: FitResult, best: Best) -> tuple[bool, dict[str, Any]]:
    """Whether a trial replaces the best so far, and the paired comparison that decided it."""
    if not _better(value, best.value):
        return False, {}
    if best.value is None:  # any value beats none
        return True, {}
    mine, theirs = _right(result), _right(best.result)
    if mine is None or theirs is None or not torch.equal(mine[0], theirs[0]):
        return True, {}  # not the same images: the higher value wins
    wins = int((mine[1] & ~theirs[1]).sum())
    losses = int((~mine[1] & theirs[1]).sum())
    replaced = wins - losses > SELECT_Z * (wins + losses) ** 0.5
    return replaced, {"trial": best.number, "wins": wins, "losses": losses}


@dataclass
class Best:
    number: int
    value: float | None
    result: FitResult
    spec: JobSpec


class Search:
    """The state of one search: the study, the clock, the trials so far and the best one."""

    def __init__(
        self,
        config: JobSpec,
        prepare_data: Callable[[JobSpec], PreparedData],
        outer: Callbacks,
        pruner: optuna.pruners.BasePruner | None,
        fit_kwargs: dict[str, Any],
        started: float | None = None,
    ):
        assert config.search is not None
        self.config, self.spec = config, config.search
        self.prepare_data, self.outer, self.fit_kwargs = prepare_data, outer, fit_kwargs
        # The budget counts from the job's start (planning, downloads included), and ends
        # early enough for the best model's export.
        self.start = time.monotonic() if started is None else started
        budget = self.spec.budget_seconds
        self.end = self.start + budget  # what the user reads as the budget
        self.deadline = self.end - min(EXPORT_SECONDS, EXPORT_SHARE * budget)
        # The least time worth starting a trial for: half an equal share, not under fit's least.
        self.floor = max(MIN_FIT_SECONDS, 0.5 * self.spec.budget_seconds / self.spec.trials)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log line per trial
        self.study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(
                seed=config.seed, n_startup_trials=max(2, self.spec.trials // 2)
            ),
            pruner=pruner or default_pruner(),
        )
        self.space = SearchSpace.around(config)
        self.study.enqueue_trial(self.space.baseline(config))
        self.data_by_size: dict[int, PreparedData] = {}
        self.rows: list[dict[str, Any]] = []
        self.best: Best | None = None
        self.first_error: Exception | None = None
        self.overrun: float | None = None  # the most a fit ran past its deadline (evaluation)
        # What the quickest trial took to finish its first epoch (its feature pass and
        # probe: never cut) and its evaluation: no trial starts with less time than that.
        self.least_trial = 0.0
        self.canceled = False

    def run(self) -> FitResult:
        for number in range(self.spec.trials):
            left = self.deadline - time.monotonic()
            if number > 0 and left < max(self.floor, self.least_trial):
                log.info("search: %.1f s left, too little for trial %d", left, number + 1)
                break
            if number > 0 and self.outer.should_stop():  # the first runs, as a plain fit would
                self.canceled = True
                break
            self.trial(number)
            if self.canceled:
                break
        return self.result()

    def fit_budget(self, number: int) -> tuple[float, float]:
        """(seconds this trial's fit may train, margin kept for its evaluation): an equal
        share of what is left. The first trial, the job as given, keeps the job's own time
        budget when it has one and that still leaves the others `floor` seconds each."""
        left = self.deadline - time.monotonic()
        trials_left = self.spec.trials - number
        share = left / trials_left
        # Evaluation runs past a fit's deadline: keep what it took before (with some slack),
        # or a tenth of the share until one trial has shown it.
        margin = 0.1 * share if self.overrun is None else max(0.5, 1.5 * self.overrun)
        own = self.config.time_budget_seconds
        if own and number == 0:
            # The job as planned: its budget counts from the job's start, planning included.
            own = max(MIN_FIT_SECONDS, own - (time.monotonic() - self.start))
        seconds = share - margin
        if number == 0 and own:
            seconds = max(seconds, min(own, left - (trials_left - 1) * self.floor - margin))
        seconds = min(seconds, own) if own else seconds
        # Never past the search's deadline, whatever fit's least budget is.
        return min(max(MIN_FIT_SECONDS, seconds), max(1.0, left - margin)), margin

    def trial(self, number: int) -> None:
        t0 = time.monotonic()
        trial = self.study.ask()
        params = self.space.sample(trial)
        label = f"search: trial {number + 1}/{self.spec.trials}"
        spec = trial_spec(self.config, None if number == 0 else params, self.spec.budget_seconds)
        row: dict[str, Any] = {"number": number, "params": trial_params(spec)}
        hooks = TrialCallbacks(self.outer, trial, label, self.deadline)
        try:
            data = self.data_by_size.get(spec.resize_size)
            if data is None:
                self.outer.on_phase(f"{label}: preparing")
                data = self.data_by_size[spec.resize_size] = self.prepare_data(spec)
            budget, margin = self.fit_budget(number)
            spec = spec.model_copy(update={"time_budget_seconds": budget})
            hooks.deadline = self.deadline - margin
            t_fit = time.monotonic()
            result = fit(spec, data, hooks, **self.fit_kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded; the search goes on
            log.warning("search: trial %d failed: %s", number + 1, exc, exc_info=True)
            self.first_error = self.first_error or exc
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            seconds = round(time.monotonic() - t0, 2)
            self.rows.append(
                {**row, "value": None, "state": "failed", "seconds": seconds, "best_epoch": None}
                | {"error": f"{type(exc).__name__}: {exc}"[:500]}
            )
            return
        if hooks.first_epoch_at is not None:
            # From the fit's start: a size's data is prepared once, for its first trial only.
            first = hooks.first_epoch_at - t_fit + (self.overrun or 0.0)
            self.least_trial = first if not self.least_trial else min(self.least_trial, first)
        if result.stopped_reason == "time_budget" or hooks.out_of_time:
            stop_at = min(t_fit + budget, hooks.deadline)
            late = max(0.0, time.monotonic() - stop_at)
            self.overrun = late if self.overrun is None else max(self.overrun, late)
        value = _value(result)
        cut = result.stopped_reason == "callback"  # by us: pruned at its last epoch is done
        state = "stopped" if hooks.canceled else "pruned" if hooks.pruned and cut else "complete"
        if state == "complete" and value is not None:
            self.study.tell(trial, value)
        else:
            failed = state == "complete"  # no epoch finished: nothing for the sampler to learn
            tell = optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.PRUNED
            self.study.tell(trial, state=tell)
        self.rows.append(
            {
                **row,
                "value": value,
                "state": state,
                "seconds": round(time.monotonic() - t0, 2),
                "best_epoch": result.best.get("epoch"),
                "stopped_reason": result.stopped_reason,
            }
        )
        log.info(
            "search: trial %d/%d %s, val_accuracy %s, %s",
            number + 1,
            self.spec.trials,
            state,
            value,
            row["params"],
        )
        replaced, paired = (True, {}) if self.best is None else _replaces(value, result, self.best)
        if paired:  # a higher validation accuracy than the best's: was it beyond chance?
            self.rows[-1]["against_best"] = {**paired, "replaced": replaced}
        if replaced:
            self.best = Best(number, value, result, spec)  # only the best model is kept
        self.canceled = hooks.canceled

    def result(self) -> FitResult:
        if self.best is None:
            if self.first_error is not None:
                raise self.first_error
            raise RuntimeError("the search ran no trial")
        result = self.best.result
        for metrics in result.history:  # the job's metrics and curves: the delivered model's
            self.outer.on_epoch_end(metrics, result.best)
        result.extra["search"] = {
            "trials": self.rows,
            "best_trial": self.best.number,
            "budget_seconds": self.spec.budget_seconds,
            "seconds": round(time.monotonic() - self.start, 2),
            "space": self.space.describe(),
            "config": self.best.spec.model_dump(mode="json"),
        }
        if self.canceled:
            result.stopped_reason = "callback"
        return result


def run_search(
    config: JobSpec,
    prepare_data: Callable[[JobSpec], PreparedData],
    callbacks: Callbacks | None = None,
    *,
    pruner: optuna.pruners.BasePruner | None = None,
    started: float | None = None,
    **fit_kwargs: Any,
) -> FitResult:
    """Run `config.search`; return the best trial's `FitResult` with `extra["search"]`:
    every trial (number, params, value, state: complete/pruned/failed/stopped, seconds,
    best_epoch; `against_best`, the paired comparison, for a trial that scored higher than
    the best so far on the same single-label validation images), `best_trial`,
    `budget_seconds`, `seconds`, the `space` searched and the best trial's `config`. Its
    history is replayed to `callbacks.on_epoch_end`.

    `prepare_data(spec)` gives the data at `spec`'s input size (called once per size);
    `fit_kwargs` go to every `fit` (device, weights, num_workers, pretrained). `pruner`
    replaces the default median pruner. `started` (time.monotonic): when the job started;
    `budget_seconds` counts from there (default: from this call), everything included,
    a few seconds kept for the export. A trial that raises is recorded as failed and the
    search goes on; when every trial failed, the first error is raised."""
    if config.search is None:
        raise ValueError("run_search needs a config with `search`")
    if fit_kwargs.pop("resume", None) is not None:
        log.warning("a search is never resumed: it starts over")
    return Search(config, prepare_data, callbacks or Callbacks(), pruner, fit_kwargs, started).run()


def searched_config(config: C, result: FitResult) -> C:
    """`config` (the job's, of its own type) with the best trial's training fields: what the
    delivered model was trained with, so export and prediction preprocess as it did."""
    chosen = result.extra["search"]["config"]
    keep = {"search", "recipe", "time_budget_seconds"}
    fields = config.model_dump(mode="json", exclude={"search"})
    fields.update({k: v for k, v in chosen.items() if k not in keep})
    return type(config).model_validate(fields).model_copy(update={"search": config.search})

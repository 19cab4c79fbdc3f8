"""Hyper-parameter search: `config.search.trials` runs of `fit` inside `budget_seconds` in all.

An in-memory Optuna study (TPE, seeded by the job's seed) samples the learning rate, weight
decay, input size, augmentation preset and epochs around the job's own values
(`search_space.py`; and lp_ft against the probe when the recipe chose a probe). The trials
have the budget less the final run's share (`search_final.FINAL_SHARE`). The first trial is
the job's config as given (with the job's own time budget, when it has one and that leaves
the other trials room), so a search never delivers a worse validation accuracy than the
single run would have. Every other trial gets an equal share of what is left of the trials'
time (a trial that ends early leaves its time to the next ones); one that falls below the
median of the finished ones at the same epoch is pruned (stopped: its model so far is kept
as a candidate). Trials at the same input size share one image cache (`prepare_data` is
called once per size). A later trial replaces the best so far only when it is better beyond
chance on the same validation images (`search_select.replaces`), so on a few hundred of them
a one-image lead never swaps the planned config for a luckier one. Then the final run trains
the best trial's config again for as many epochs as the time left fits, and is delivered
unless it validates lower than the best trial (`search_final.py`: why). Every run is listed
in `extra["search"]`. `budget_seconds` counts from the job's start when the caller says when
that was (`started`), planning included; no trial starts with less time left than the
quickest one took to its first epoch and evaluation.

The config given must be concrete (the auto recipe already resolved): every trial runs its
fields as they are (`recipe="manual"`). A search is never resumed: an interrupted one
starts over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna

from core.jobspec import JobSpec
from worker.training.callbacks import Callbacks
from worker.training.data import PreparedData
from worker.training.fit import FitResult, fit
from worker.training.recipe import EPOCHS_CAP
from worker.training.search_callbacks import TrialCallbacks
from worker.training.search_final import FINAL_SHARE, Candidate, plan_final
from worker.training.search_select import Best, replaces, value_of
from worker.training.search_space import MIN_FIT_SECONDS, SearchSpace, trial_params, trial_spec

log = logging.getLogger(__name__)

# Pruning: a trial is compared with the finished ones at the same epoch from its first
# fine-tuning epoch on (epoch 0, lp_ft's probe, is never pruned: fine-tuning may lift any
# probe), as soon as one trial has finished. Short trials have one to three epochs: a
# rule that waits for epoch 2 and two finished trials (Optuna's defaults) prunes nothing.
PRUNE_WARMUP_EPOCHS = 1
PRUNE_STARTUP_TRIALS = 1
# Kept for what follows the search inside its budget: the worker's delivery of the best
# model (export, checks, label issues: `delivery_reserve`), at most this share of it.
EXPORT_SECONDS, DELIVERY_SHARE = 5.0, 0.1

C = TypeVar("C", bound=JobSpec)


def default_pruner() -> optuna.pruners.BasePruner:
    """Optuna's median rule, from the first fine-tuning epoch and the first finished trial."""
    return optuna.pruners.MedianPruner(
        n_startup_trials=PRUNE_STARTUP_TRIALS, n_warmup_steps=PRUNE_WARMUP_EPOCHS
    )


def run_epochs(spec: JobSpec) -> int:
    """The epochs a run's progress counts: a linear probe's one step is its only one."""
    return 1 if spec.strategy == "linear_probe" else spec.epochs


def delivery_reserve(config: JobSpec, budget: float) -> float:
    """Seconds the search keeps for the best model's delivery: the auto recipe's estimate
    (`plan.speed.estimated_delivery_seconds`, from the dataset and the measured speed) when
    it planned the job, else `EXPORT_SECONDS`; at most `DELIVERY_SHARE` of the budget."""
    speed = (getattr(config, "plan", None) or {}).get("speed") or {}
    estimated = speed.get("estimated_delivery_seconds") or EXPORT_SECONDS
    return float(min(estimated, DELIVERY_SHARE * budget))


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
        self.deadline = self.end - delivery_reserve(config, budget)
        self.space = SearchSpace.around(config)
        # The trials end early enough for the final run (`search_final.py`): the best
        # trial's config trained again for what is left, at least FINAL_SHARE of the budget.
        # None for a search of linear probes only (nothing to train longer).
        probes_only = config.strategy == "linear_probe" and not self.space.strategies
        final = FINAL_SHARE * budget if self.spec.retrain_best and not probes_only else 0.0
        self.retrain = final > 0
        self.trials_deadline = self.deadline - final
        # The least time worth starting a trial for: half an equal share, not under fit's least.
        self.floor = max(MIN_FIT_SECONDS, 0.5 * (budget - final) / self.spec.trials)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log line per trial
        self.study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(
                seed=config.seed, n_startup_trials=max(2, self.spec.trials // 2)
            ),
            pruner=pruner or default_pruner(),
        )
        self.study.enqueue_trial(self.space.baseline(config))
        self.data_by_size: dict[int, PreparedData] = {}
        self.rows: list[dict[str, Any]] = []
        self.best: Best | None = None
        self.tuned: Candidate | None = None  # the best trial that fine-tuned (a part epoch too)
        self.first_error: Exception | None = None
        self.overrun: float | None = None  # the most a fit ran past its deadline (evaluation)
        # What the quickest trial took to finish its first epoch (its feature pass and
        # probe: never cut) and its evaluation: no trial starts with less time than that.
        self.least_trial = 0.0
        self.canceled = False

    def run(self) -> FitResult:
        for number in range(self.spec.trials):
            left = self.trials_deadline - time.monotonic()
            if number > 0 and left < max(self.floor, self.least_trial):
                log.info("search: %.1f s left, too little for trial %d", left, number + 1)
                break
            if number > 0 and self.outer.should_stop():  # the first runs, as a plain fit would
                self.canceled = True
                break
            self.trial(number)
            if self.canceled:
                break
        if self.retrain and not self.canceled and self.best is not None:
            if self.outer.should_stop():
                self.canceled = True
            else:
                self.final(len(self.rows))
        return self.result()

    def fit_budget(self, number: int) -> tuple[float, float]:
        """(seconds this trial's fit may train, margin kept for its evaluation): an equal
        share of what is left before the final run. The first trial, the job as given, keeps
        the job's own time budget when it has one and that still leaves the others `floor`
        seconds each."""
        left = self.trials_deadline - time.monotonic()
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
        hooks = TrialCallbacks(self.outer, trial, label, self.trials_deadline)
        try:
            data = self.data_for(spec, label)
            budget, margin = self.fit_budget(number)
            spec = spec.model_copy(update={"time_budget_seconds": budget})
            hooks.deadline = self.trials_deadline - margin
            self.outer.on_run(run_epochs(spec))  # the job's progress counts this trial's
            t_fit = time.monotonic()
            result = fit(spec, data, hooks, **self.fit_kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded; the search goes on
            self.failed(row, exc, t0)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        if hooks.first_epoch_at is not None:
            # From the fit's start: a size's data is prepared once, for its first trial only.
            first = hooks.first_epoch_at - t_fit + (self.overrun or 0.0)
            self.least_trial = first if not self.least_trial else min(self.least_trial, first)
        if result.stopped_reason == "time_budget" or hooks.out_of_time:
            stop_at = min(t_fit + budget, hooks.deadline)
            late = max(0.0, time.monotonic() - stop_at)
            self.overrun = late if self.overrun is None else max(self.overrun, late)
        value = value_of(result)
        cut = result.stopped_reason == "callback"  # by us: pruned at its last epoch is done
        state = "stopped" if hooks.canceled else "pruned" if hooks.pruned and cut else "complete"
        if state == "complete" and value is not None:
            self.study.tell(trial, value)
        else:
            failed = state == "complete"  # no epoch finished: nothing for the sampler to learn
            tell = optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.PRUNED
            self.study.tell(trial, state=tell)
        clock = hooks.clock(t_fit, spec)
        self.rows.append(
            {
                **row,
                "value": value,
                "state": state,
                "seconds": round(time.monotonic() - t0, 2),
                "best_epoch": result.best.get("epoch"),
                "epochs_run": clock.epochs if clock is not None else 0,
                "stopped_reason": result.stopped_reason,
            }
        )
        tuned = self.tuned
        higher = tuned is None or tuned.value is None or (value or 0.0) > tuned.value
        if clock is not None and value is not None and higher:  # a part of an epoch counts
            self.tuned = Candidate(number, value, spec, clock)
        log.info(
            "search: trial %d/%d %s, val_accuracy %s, %s",
            number + 1,
            self.spec.trials,
            state,
            value,
            row["params"],
        )
        replaced, paired = (True, {}) if self.best is None else replaces(value, result, self.best)
        if paired:  # a higher validation accuracy than the best's: was it beyond chance?
            self.rows[-1]["against_best"] = {**paired, "replaced": replaced}
        if replaced:  # only the best model is kept
            self.best = Best(number, value, result, spec, clock)
        self.canceled = hooks.canceled

    def data_for(self, spec: JobSpec, label: str) -> PreparedData:
        data = self.data_by_size.get(spec.resize_size)
        if data is None:
            self.outer.on_phase(f"{label}: preparing")
            data = self.data_by_size[spec.resize_size] = self.prepare_data(spec)
        return data

    def failed(self, row: dict[str, Any], exc: Exception, t0: float) -> None:
        log.warning("search: run %d failed: %s", row["number"] + 1, exc, exc_info=True)
        self.first_error = self.first_error or exc
        seconds = round(time.monotonic() - t0, 2)
        self.rows.append(
            {**row, "value": None, "state": "failed", "seconds": seconds, "best_epoch": None}
            | {"error": f"{type(exc).__name__}: {exc}"[:500]}
        )

    def final(self, number: int) -> None:
        """The best trial's config trained again for as many epochs as the time left fits
        (`search_final.py`); delivered unless its validation score is lower than the best
        trial's. When the best trial is a linear probe, the best trial that fine-tuned is
        the one trained longer. Skipped, with the reason in its row, when that is no more
        epochs than the trial ran."""
        assert self.best is not None
        best, t0 = self.best, time.monotonic()
        margin = max(0.5, 1.5 * self.overrun) if self.overrun is not None else None
        left = self.deadline - t0
        left -= 0.1 * left if margin is None else margin
        base = self.tuned
        if best.clock is not None:
            base = Candidate(best.number, best.value, best.spec, best.clock)
        pinned = getattr(self.config, "pinned", None) or []
        auto = self.config.recipe == "auto"
        # The user's epochs (or a manual recipe's): no more than the search itself tries.
        cap = EPOCHS_CAP if auto and "epochs" not in pinned else self.space.epochs[1]
        spec, why = plan_final(base, left, cap, auto and "warmup_epochs" not in pinned)
        row: dict[str, Any] = {"number": number, "retrains": best.number, "delivered": False}
        row["compared_with"] = best.number  # the best trial: delivered unless this beats it
        row["params"] = trial_params(best.spec)
        if base is not None:
            row.update(retrains=base.number, params=trial_params(base.spec))
        if spec is None:
            self.rows.append({**row, "state": "skipped", "value": None, "reason": why})
            return
        row["params"] = trial_params(spec)
        label = f"search: final run ({spec.epochs} epochs)"
        hooks = TrialCallbacks(self.outer, None, label, t0 + left)
        try:
            data = self.data_for(spec, label)
            self.outer.on_run(run_epochs(spec))
            t_fit = time.monotonic()
            result = fit(spec, data, hooks, **self.fit_kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded; the best trial stays delivered
            self.failed(row, exc, t0)
            return
        value = value_of(result)
        # The same config trained longer: the higher validation score wins, a tie the final.
        kept = best.value is not None and (value is None or best.value > value)
        clock = hooks.clock(t_fit, spec)
        self.rows.append(
            {
                **row,
                "value": value,
                "state": "stopped" if hooks.canceled else "complete",
                "seconds": round(time.monotonic() - t0, 2),
                "best_epoch": result.best.get("epoch"),
                "epochs_run": clock.epochs if clock is not None else 0,
                "stopped_reason": result.stopped_reason,
                "delivered": not kept,
            }
        )
        if not kept:
            self.best = Best(number, value, result, spec, clock)
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
    """Run `config.search`; return the delivered run's `FitResult` with `extra["search"]`:
    every run (number, params, value, state: complete/pruned/failed/stopped, seconds,
    best_epoch; `against_best`, the paired comparison, for a trial that scored higher than
    the best so far on the same single-label validation images), then the final run's row
    (`retrains`: the trial whose config it trained again; `delivered`; state `skipped` with
    a `reason` when the time left fitted no more epochs), `best_trial` (the delivered run's
    number), `budget_seconds`, `seconds`, the `space` searched and the delivered run's
    `config`. Its history is replayed to `callbacks.on_epoch_end`.

    `prepare_data(spec)` gives the data at `spec`'s input size (called once per size);
    `fit_kwargs` go to every `fit` (device, weights, num_workers, pretrained). `pruner`
    replaces the default median pruner. `started` (time.monotonic): when the job started;
    `budget_seconds` counts from there (default: from this call), everything included,
    the best model's delivery kept back (`delivery_reserve`). A trial that raises is
    recorded as failed and the search goes on; when every trial failed, the first error is
    raised."""
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

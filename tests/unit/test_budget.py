"""Time budgets: the default budget, the reserve kept for what runs after training, and
the warning a cut-short job carries. (Planning itself trains: tests/training/test_recipe.py.)"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from core.jobspec import JobConfig
from worker.planning import budget_warnings
from worker.training.callbacks import Callbacks
from worker.training.control import Control
from worker.training.data import balanced_subset
from worker.training.recipe import MIN_DEFAULT_BUDGET, default_budget_cap


def test_the_default_budget_grows_with_the_dataset_and_is_minutes_on_a_cpu():
    assert default_budget_cap(1000, "cpu") == pytest.approx(150.0)
    assert default_budget_cap(10, "cpu") == MIN_DEFAULT_BUDGET
    assert default_budget_cap(1000, "cuda") < default_budget_cap(1000, "cpu")
    assert default_budget_cap(10**7, "cpu") == 3600.0


def test_epochs_are_planned_only_up_to_the_deadline_less_the_reserve():
    control = Control(Callbacks(), None, deadline=time.monotonic() + 100.0)
    assert control.epochs_within_budget(1, 50, per_epoch=10.0) == 10  # 1 + 99 // 10
    control.reserve = 30.0
    assert control.epochs_within_budget(1, 50, per_epoch=10.0) == 7  # 1 + 69 // 10
    control.reserve = 500.0
    assert control.epochs_within_budget(3, 50, per_epoch=10.0) == 3  # never below what ran


def test_a_deadline_given_by_the_caller_wins_over_counting_from_now():
    deadline = time.monotonic() + 7.0
    assert Control(Callbacks(), 60.0, deadline=deadline).deadline == deadline
    assert Control(Callbacks(), 60.0).deadline == pytest.approx(time.monotonic() + 60.0, abs=1)
    assert Control(Callbacks(), None).deadline is None


def trained(stopped: str | None, fitted: int | None, epochs: int = 6, done: int = 2):
    config = JobConfig(dataset_id="ds_1", epochs=epochs, time_budget_seconds=60)
    history = [{"phase": "probe", "epoch": 0}] + [
        {"phase": "fine_tune", "epoch": i + 1} for i in range(done)
    ]
    extra = {} if fitted is None else {"epochs_fitted_to_budget": fitted}
    result = SimpleNamespace(
        history=history, extra=extra, stopped_reason=stopped, best={"epoch": 2}
    )
    return SimpleNamespace(config=config, result=result, data=None)


def test_a_job_the_budget_cut_short_says_so():
    (warning,) = budget_warnings(trained("time_budget", None))  # type: ignore[arg-type]
    assert "time budget (60 s)" in warning and "2 of the 6 planned" in warning
    assert "epoch 2" in warning
    (warning,) = budget_warnings(trained(None, 3, done=3))  # type: ignore[arg-type]
    assert "3 of the 6 planned" in warning


def test_a_job_that_ran_its_plan_has_no_warning():
    assert budget_warnings(trained(None, None, epochs=2, done=2)) == []  # type: ignore[arg-type]
    assert budget_warnings(trained("early_stopping", None)) == []  # type: ignore[arg-type]


def test_a_budget_limited_probe_keeps_every_class():
    labels = [0] * 50 + [1] * 30 + [2] * 5
    idx = np.arange(len(labels))
    subset = balanced_subset(idx, labels, 30, seed=0)
    assert len(subset) == 30
    counts = np.bincount(np.asarray(labels)[subset], minlength=3)
    assert counts.tolist() == [13, 12, 5]  # round robin: the small class is kept whole
    assert np.array_equal(subset, balanced_subset(idx, labels, 30, seed=0))


def chosen_by_recipe(epochs: int, strategy: str = "lp_ft", **fields: object) -> JobConfig:
    return JobConfig.model_validate(
        {
            "dataset_id": "ds_1",
            "epochs": epochs,
            "strategy": strategy,
            "plan": {"choices": {"epochs": epochs}},
            **fields,
        }
    )


def test_only_epochs_the_recipe_chose_may_grow_and_a_short_lp_ft_plan_stays_short():
    from worker.training.finetune import BACKOFF_MAX_EPOCHS, EPOCHS_CAP, growth_cap

    assert growth_cap(chosen_by_recipe(8)) == EPOCHS_CAP
    assert growth_cap(chosen_by_recipe(2, strategy="full")) == EPOCHS_CAP
    # gradual unfreezes over the planned epochs; step and one-cycle have no warm-up to grow in.
    assert growth_cap(chosen_by_recipe(8, strategy="gradual")) is None
    assert growth_cap(chosen_by_recipe(8, schedule="step")) is None
    assert growth_cap(chosen_by_recipe(8, schedule="onecycle")) is None
    # Its 1e-4 rate and backoff were chosen for a short plan.
    assert growth_cap(chosen_by_recipe(2)) == BACKOFF_MAX_EPOCHS
    # The user's epochs (the recipe's record has none), a manual job, a search trial's spec.
    user_set = JobConfig.model_validate(
        {"dataset_id": "ds_1", "epochs": 8, "plan": {"choices": {"backbone": "resnet18"}}}
    )
    assert growth_cap(user_set) is None
    assert growth_cap(chosen_by_recipe(8, recipe="manual")) is None
    assert growth_cap(JobConfig(dataset_id="ds_1", epochs=8)) is None


class Planned(Callbacks):
    def __init__(self) -> None:
        self.plans: list[int] = []

    def on_plan(self, epochs: int) -> None:
        self.plans.append(epochs)


def refit_run(config: JobConfig, seconds_left: float, steps_per_epoch: int = 10):
    from worker.training.optim import LrPlan

    told = Planned()
    control = Control(told, None, deadline=time.monotonic() + seconds_left)
    run = SimpleNamespace(config=config, control=control, extra={})
    plan = LrPlan("cosine", steps_per_epoch, config.epochs, warmup_steps=2 * steps_per_epoch)
    return run, plan, told


def test_a_faster_machine_grows_the_schedule_while_it_warms_up_only():
    from worker.training.finetune import GROW_MARGIN, refit_to_budget

    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=100.0)
    # After epoch 1 of 8 (10 s each): still warming up, 1 + 100 // 11 = 10 fit.
    fits = refit_to_budget(run, plan, 1, 8, per_epoch=10.0, steps_done=10)  # type: ignore[arg-type]
    assert fits == 1 + int(100.0 // (10.0 * GROW_MARGIN)) == 10
    assert plan.epochs == 10 and plan.total_steps == 100
    assert run.extra["epochs_fitted_to_budget"] == 10 and told.plans == [10]
    # At the warm-up's end the cosine has not started yet: it still grows.
    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=100.0)
    assert refit_to_budget(run, plan, 2, 8, 10.0, steps_done=20) == 11  # type: ignore[arg-type]
    # Past the warm-up the cosine has started: the schedule is kept as it is.
    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=100.0)
    assert refit_to_budget(run, plan, 3, 8, 10.0, steps_done=30) == 8  # type: ignore[arg-type]
    assert plan.epochs == 8 and told.plans == [] and "epochs_fitted_to_budget" not in run.extra


def test_a_slower_machine_shrinks_the_schedule_and_users_epochs_never_grow():
    from worker.training.finetune import refit_to_budget

    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=35.0)
    assert refit_to_budget(run, plan, 1, 8, 10.0, steps_done=10) == 4  # type: ignore[arg-type]
    assert plan.epochs == 4 and told.plans == [4]
    pinned = JobConfig(dataset_id="ds_1", epochs=8)
    run, plan, told = refit_run(pinned, seconds_left=1000.0)
    assert refit_to_budget(run, plan, 1, 8, 10.0, steps_done=10) == 8  # type: ignore[arg-type]
    assert told.plans == []


def test_a_job_that_grew_its_schedule_has_no_warning():
    (warning,) = budget_warnings(trained(None, 3, epochs=6, done=3))  # type: ignore[arg-type]
    assert budget_warnings(trained(None, 9, epochs=6, done=9)) == []  # type: ignore[arg-type]
    # Grown to 9, then the deadline cut the 8th: counted against the grown plan.
    (warning,) = budget_warnings(trained("time_budget", 9, epochs=6, done=8))  # type: ignore[arg-type]
    assert "8 of the 9 planned" in warning

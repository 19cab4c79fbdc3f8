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

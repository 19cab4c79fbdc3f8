"""Time budgets: the default budget, the reserve kept for what runs after training, and
the warning a cut-short job carries. (Planning itself trains: tests/training/test_recipe.py.)"""

from __future__ import annotations

import math
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
    # With the seconds a shorter epoch pays in full (validation, checkpoint): the part of
    # one that fits. 750 s left at 100 s an epoch: 7 epochs, then 50 s, 30 of them
    # training (30 / 80 = 0.375: 0.35 in twentieths, and seconds of drift change nothing).
    control = Control(Callbacks(), None, deadline=time.monotonic() + 1000.0)
    control.reserve = 250.0
    assert control.epochs_within_budget(1, 50, 100.0, fixed=20.0) == pytest.approx(8.35)
    assert control.epochs_within_budget(1, 8.2, 100.0, fixed=20.0) == pytest.approx(8.2)
    control.reserve = 275.0  # 25 s after 7 epochs: 5 s of training, under a quarter
    assert control.epochs_within_budget(1, 50, 100.0, fixed=20.0) == 8


def test_training_keeps_back_the_final_evaluation_and_the_delivery_and_stops_before_them(
    monkeypatch,
):
    """After training a job evaluates its model (validation and test), exports it and finds
    its label issues: epochs are planned only up to the deadline less all of that, and a
    step ends training once only that and its epoch's validation are left."""
    from worker.training.refit import delivery_seconds, keep_back
    from worker.training.search_callbacks import TrialCallbacks

    # 3 s of export + 256 + 256 + 80 checked images at 0.01 s, 0.5 s + 1,000 x 1 ms of
    # label issues; a validation split over 256 images is checked on 256 only.
    assert delivery_seconds(300, 1000, 0.01) == pytest.approx(3.0 + 5.92 + 0.5 + 1.0)
    assert delivery_seconds(10, 50, 0.0) == pytest.approx(3.0 + 0.5 + 0.05)
    assert delivery_seconds(10, 50, 0.1) > delivery_seconds(10, 50, 0.01)

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    data = SimpleNamespace(
        val_idx=list(range(100)), train_idx=list(range(400)), test_idx=list(range(300))
    )
    control = Control(Callbacks(), None, deadline=1100.0)
    run = SimpleNamespace(control=control, data=data, probe_cache=("the probe's features",))
    keep_back(run, 2.0, saving=0.5)  # type: ignore[arg-type]
    # Validation 2 s, test 6 s; delivery 3 + 280 x 0.02 + 0.5 + 0.5 = 9.6 s.
    assert control.reserve == pytest.approx(8.0 + 9.6)
    # ... and the stopped epoch's own validation and checkpoint.
    assert control.stop_margin == pytest.approx(control.reserve + 2.0 + 0.5)
    clock[0] = 1100.0 - control.stop_margin - 0.1
    assert not control.should_stop()
    clock[0] += 0.2  # still 20 s before the deadline: what follows training needs them
    assert control.should_stop() and control.reason == "time_budget"
    # No probe features (`full`, a resumed run): the label issues pass 500 images first.
    run.probe_cache = None
    keep_back(run, 2.0)  # type: ignore[arg-type]
    assert control.reserve == pytest.approx(8.0 + 9.6 + 500 * 0.02)
    # A search's trial: its model is not delivered (the search keeps time for the best one's).
    trial = Control(TrialCallbacks(Callbacks(), None, "trial 1", 2000.0), None, deadline=1100.0)
    assert not trial.delivers_model
    keep_back(SimpleNamespace(control=trial, data=data), 2.0)  # type: ignore[arg-type]
    assert trial.reserve == pytest.approx(8.0) and trial.stop_margin == pytest.approx(10.0)


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
    from worker.training.refit import BACKOFF_MAX_EPOCHS, EPOCHS_CAP, growth_cap

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
        self.plans: list[float] = []

    def on_plan(self, epochs: float) -> None:
        self.plans.append(epochs)


def refit_run(config: JobConfig, seconds_left: float, steps_per_epoch: int = 10):
    from worker.training.optim import LrPlan

    told = Planned()
    control = Control(told, None, deadline=time.monotonic() + seconds_left)
    run = SimpleNamespace(config=config, control=control, extra={})
    plan = LrPlan("cosine", steps_per_epoch, config.epochs, warmup_steps=2 * steps_per_epoch)
    return run, plan, told


def test_a_faster_machine_grows_the_schedule_during_and_after_the_warm_up():
    from worker.training.refit import GROW_MARGIN, GROW_UNTIL_DECAYED, refit_to_budget

    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=1000.0)
    # After epoch 1 of 8 (100 s each, 20 of them validation and checkpoint): still warming
    # up. 9 more epochs fit at 105 s (945 s); of the 55 s left, 35 s train: 35 / 85 = 0.41
    # of an epoch, a last epoch of 0.4 (in twentieths).
    fits = refit_to_budget(run, plan, 1, per_epoch=100.0, steps_done=10, fixed_seconds=20.0)  # type: ignore[arg-type]
    assert GROW_MARGIN == 1.05 and fits == 11
    assert plan.planned_epochs == pytest.approx(10.4) and plan.total_steps == 104
    assert [plan.steps_in_epoch(e) for e in (10, 11, 12)] == [10, 4, 0]
    assert run.extra["epochs_fitted_to_budget"] == 10.4 and told.plans == [10.4]
    # At the warm-up's end the cosine has not started yet: it still grows.
    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=1000.0)
    assert refit_to_budget(run, plan, 2, 100.0, steps_done=20, fixed_seconds=20.0) == 12  # type: ignore[arg-type]
    assert plan.planned_epochs == pytest.approx(11.4)
    # Past the warm-up the cosine has started: it grows too, and goes on from the learning
    # rate it has reached (no jump), decaying more slowly over the longer plan.
    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=1000.0)
    before = [plan(s) for s in range(32)]
    # 9 more epochs at 105 s, then 55 s: half an epoch (no fixed seconds given).
    assert refit_to_budget(run, plan, 3, 100.0, steps_done=30) == 13  # type: ignore[arg-type]
    assert plan.planned_epochs == 12.5 and told.plans == [12.5]
    assert plan(30) == before[30]  # the next step's rate, as it was
    assert before[31] < plan(31) < before[30]
    assert plan(124) > 0.0 and plan(125) == pytest.approx(0.0)
    # Past half the decay (and at the plan's end, where it would add epochs at a rate of
    # zero): no growth.
    for done_epochs in (6, 8):
        run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=1000.0)
        assert plan.decayed(done_epochs * 10) > GROW_UNTIL_DECAYED
        assert refit_to_budget(run, plan, done_epochs, 100.0, steps_done=done_epochs * 10) == 8  # type: ignore[arg-type]
        assert plan.planned_epochs == 8 and told.plans == []
    # A shorter epoch ran: no growth (it would sit in the middle of the longer run).
    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=1000.0)
    plan.replan(7.5)
    assert refit_to_budget(run, plan, 8, 100.0, steps_done=75) == 8  # type: ignore[arg-type]
    assert plan.planned_epochs == 7.5 and told.plans == []


def test_a_refit_past_the_warm_up_keeps_the_learning_rate_where_it_is():
    from worker.training.optim import LrPlan

    plan = LrPlan("cosine", steps_per_epoch=10, epochs=10, warmup_steps=20)
    at_50 = plan(50)  # 30 of 80 decay steps done
    assert at_50 == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 80)))
    plan.refit(50, 6)  # shorter: from the same rate to zero over the 10 steps left
    assert plan(50) == pytest.approx(at_50) and plan(60) == pytest.approx(0.0)
    assert plan(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * (30 / 80 + 50 / 80 / 2))))
    plan.refit(55, 16)  # longer again: no jump at step 55, zero at the new end
    assert plan(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * (30 / 80 + 50 / 80 / 2))))
    assert plan(160) == pytest.approx(0.0) and plan(100) > plan(130) > 0.0
    # Within the warm-up (and at its last step) nothing has decayed: a plain re-plan.
    warm = LrPlan("cosine", steps_per_epoch=10, epochs=4, warmup_steps=20)
    warm.refit(20, 8)
    assert warm.anchor_step == 20 and warm.anchor_progress == 0.0
    assert warm(50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 60)))


def test_a_refitted_schedule_resumes_with_the_same_learning_rates(tmp_path):
    """LambdaLR saves a callable object's fields: a restart after a re-fit past the warm-up
    goes on at the same rates; a checkpoint written before schedules had an anchor (no such
    fields) resumes on the plain cosine, as it was planned."""
    import torch

    from worker.training.optim import LrPlan

    def scheduler() -> torch.optim.lr_scheduler.LambdaLR:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return torch.optim.lr_scheduler.LambdaLR(opt, LrPlan("cosine", 10, 10, 20))

    first = scheduler()
    for _ in range(50):
        first.optimizer.step()
        first.step()
    first.lr_lambdas[0].refit(50, 14)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    old = first.state_dict()
    for fn in old["lr_lambdas"]:
        fn.pop("anchor_step"), fn.pop("anchor_progress")
    expected = [first.lr_lambdas[0](s) for s in range(50, 140)]

    resumed = scheduler()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert [resumed.lr_lambdas[0](s) for s in range(50, 140)] == expected
    assert resumed.get_last_lr() == first.get_last_lr()
    legacy = scheduler()
    legacy.load_state_dict(old)
    plain = LrPlan("cosine", 10, 14, 20)
    assert [legacy.lr_lambdas[0](s) for s in range(50, 140)] == [plain(s) for s in range(50, 140)]


def test_a_slower_machine_shrinks_the_schedule_to_the_part_of_an_epoch_that_fits():
    from worker.training.refit import refit_to_budget

    # 350 s left after epoch 1, 100 s an epoch (20 s fixed): 3 epochs, then 50 s, of which
    # 30 s train (30 / 80 = 0.375 of an epoch): a last epoch of 0.35.
    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=350.0, steps_per_epoch=20)
    assert refit_to_budget(run, plan, 1, 100.0, steps_done=20, fixed_seconds=20.0) == 5  # type: ignore[arg-type]
    assert plan.planned_epochs == pytest.approx(4.35) and plan.total_steps == 87
    assert plan.steps_in_epoch(5) == 7 and told.plans == [4.35]
    # Less than a quarter of an epoch's training left over: whole epochs only.
    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=330.0, steps_per_epoch=20)
    assert refit_to_budget(run, plan, 1, 100.0, steps_done=20, fixed_seconds=20.0) == 4  # type: ignore[arg-type]
    assert plan.planned_epochs == 4 and plan.steps_in_epoch(4) == 20
    # The user's epochs: never grown, and a budget shrinks them to whole epochs.
    pinned = JobConfig(dataset_id="ds_1", epochs=8)
    run, plan, told = refit_run(pinned, seconds_left=10000.0)
    assert refit_to_budget(run, plan, 1, 100.0, steps_done=10) == 8  # type: ignore[arg-type]
    assert told.plans == []
    run, plan, told = refit_run(pinned, seconds_left=350.0)
    assert refit_to_budget(run, plan, 1, 100.0, steps_done=10, fixed_seconds=20.0) == 4  # type: ignore[arg-type]
    assert plan.planned_epochs == 4 and told.plans == [4]


def test_a_plan_never_grows_after_its_shorter_last_epoch_ran():
    from worker.training.refit import refit_to_budget

    # A slow first epoch: 55 s left at 100 s an epoch (20 fixed), a last epoch of 35 / 80:
    # 0.4 in twentieths (4 steps of 10).
    run, plan, told = refit_run(chosen_by_recipe(8), seconds_left=55.0)
    assert refit_to_budget(run, plan, 1, 100.0, steps_done=10, fixed_seconds=20.0) == 2  # type: ignore[arg-type]
    assert plan.total_steps == 14
    # That epoch ran (still within the warm-up) and the machine turned fast: no growth.
    run.control.deadline = time.monotonic() + 500.0
    assert refit_to_budget(run, plan, 2, 40.0, steps_done=14, fixed_seconds=5.0) == 2  # type: ignore[arg-type]
    assert plan.total_steps == 14 and run.extra["epochs_fitted_to_budget"] == 1.4


def test_a_shorter_last_epoch_ends_the_cosine_at_its_last_step():
    from worker.training.optim import LrPlan

    plan = LrPlan("cosine", steps_per_epoch=10, epochs=5, warmup_steps=10)
    plan.replan(3.3)
    assert plan.epochs == 4 and plan.total_steps == 33
    assert [plan.steps_in_epoch(e) for e in (1, 3, 4, 5)] == [10, 10, 3, 0]
    assert plan(32) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 23)))
    assert plan(33) == pytest.approx(0.0)
    plan.replan(3)  # whole epochs: as before
    assert plan.epochs == 3 and plan.total_steps == 30 and plan.steps_in_epoch(3) == 10
    # A part too small for one step (1 or 2 steps an epoch) adds no epoch.
    one = LrPlan("cosine", steps_per_epoch=1, epochs=5, warmup_steps=1)
    one.replan(3.4)
    assert one.epochs == 3 and one.total_steps == 3 and one.steps_in_epoch(4) == 0
    two = LrPlan("cosine", steps_per_epoch=2, epochs=5, warmup_steps=1)
    two.replan(4.25)
    assert two.epochs == 4 and two.total_steps == 8
    two.replan(4.75)
    assert two.epochs == 5 and two.total_steps == 10 and two.steps_in_epoch(5) == 2


def test_a_job_that_grew_its_schedule_has_no_warning():
    (warning,) = budget_warnings(trained(None, 3, epochs=6, done=3))  # type: ignore[arg-type]
    assert budget_warnings(trained(None, 9, epochs=6, done=9)) == []  # type: ignore[arg-type]
    # Grown to 9, then the deadline cut the 8th: counted against the grown plan.
    (warning,) = budget_warnings(trained("time_budget", 9, epochs=6, done=8))  # type: ignore[arg-type]
    assert "8 of the 9 planned" in warning
    # Shrunk to a shorter last epoch, run to its end.
    (warning,) = budget_warnings(trained(None, 5.35, epochs=6, done=6))  # type: ignore[arg-type]
    assert "5.35 of the 6 planned" in warning
    # Early stopping ended it before: the epochs that ran.
    stopped = trained("early_stopping", 5.35, epochs=6, done=3)
    (warning,) = budget_warnings(stopped)  # type: ignore[arg-type]
    assert "3 of the 6 planned" in warning


def warmup_run(config: JobConfig, seconds_left: float, clock: list[float]):
    from worker.training.optim import LrPlan

    told = Planned()
    control = Control(told, None, deadline=clock[0] + seconds_left)
    # 1 s of validation at 100 images/s; after training, the job's delivery of the model
    # (refit.delivery_seconds): 3 s + 280 checked images at 0.01 s + 0.5 s + 500 x 1 ms.
    data = SimpleNamespace(val_idx=list(range(100)), train_idx=list(range(400)), test_idx=None)
    run = SimpleNamespace(
        config=config, control=control, extra={}, data=data, probe_cache=("the probe's",)
    )
    # A 1-epoch plan's warm-up: half of its 10 steps.
    plan = LrPlan("cosine", 10, config.epochs, warmup_steps=5)
    return run, plan, told


def one_epoch_plan(**fields: object) -> JobConfig:
    speed = {"inference_images_per_second": 100.0}
    return chosen_by_recipe(1, plan={"choices": {"epochs": 1}, "speed": speed}, **fields)


def test_a_warm_up_that_ends_inside_the_first_epoch_may_grow_the_plan_as_it_ends(monkeypatch):
    from worker.training.refit import WARMUP_GROW_MARGIN, WarmupRefit

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def steps(refit: WarmupRefit, per_step: float, until: int) -> None:
        for done in range(1, until + 1):
            refit(done)
            clock[0] += per_step

    # 1 s a step (timed from the first step's end), 10 steps and 1 s of validation an
    # epoch: at the warm-up's end (step 5, 4 s after the first) epoch 1 needs 5 + 1 s
    # more; the final evaluation and the delivery keep 1 + 6.8 s back. Of 37.8 s, 20 s are
    # left after epoch 1: one more epoch at 11 x 1.1 s, and (20 - 12.1 - 1) / 11.1 = 0.62
    # of one: 2.6 epochs.
    run, plan, told = warmup_run(one_epoch_plan(), 37.8, clock)
    refit = WarmupRefit(run, plan, steps_done=0)  # type: ignore[arg-type]
    assert refit.active and refit.val_seconds == pytest.approx(1.0)
    assert WARMUP_GROW_MARGIN == 1.1
    steps(refit, 1.0, 4)
    assert told.plans == []  # still warming up
    refit(5)
    assert plan.planned_epochs == pytest.approx(2.6) and told.plans == [2.6]
    assert [plan.steps_in_epoch(e) for e in (1, 2, 3)] == [10, 10, 6]  # epoch 1 stays whole
    assert run.extra["epochs_fitted_to_budget"] == 2.6
    assert run.control.reserve == pytest.approx(7.8)
    refit(6)  # once only
    assert told.plans == [2.6]
    # Room for more: up to the short lp_ft plan's cap of 3 epochs.
    run, plan, told = warmup_run(one_epoch_plan(), 100.0, clock)
    steps(WarmupRefit(run, plan, 0), 1.0, 5)  # type: ignore[arg-type]
    assert plan.planned_epochs == 3 and told.plans == [3]
    # No room: the plan stays (never shrunk here; the epoch-end re-fit measures a whole epoch).
    run, plan, told = warmup_run(one_epoch_plan(), 18.8, clock)
    steps(WarmupRefit(run, plan, 0), 1.0, 5)  # type: ignore[arg-type]
    assert plan.planned_epochs == 1 and told.plans == [] and run.extra == {}
    # Not even the first epoch fits before training must stop (the margin `keep_back`
    # sets): it ends at the last step that does, and the cosine with it.
    run, plan, told = warmup_run(one_epoch_plan(), 18.8, clock)
    run.control.stop_margin = 11.8  # 3 s left at the warm-up's end: 2 steps at 1.1 s
    steps(WarmupRefit(run, plan, 0), 1.0, 5)  # type: ignore[arg-type]
    assert plan.total_steps == 7 and plan.steps_in_epoch(1) == 7 and plan.epochs == 1
    assert told.plans == [0.7] and run.extra["epochs_fitted_to_budget"] == 0.7
    assert plan(6) > 0.0 and plan(7) == pytest.approx(0.0, abs=1e-9)
    # Distributed: the ranks agree on the step (the least any of them timed), or one would
    # wait in a collective the other never joins.
    run, plan, told = warmup_run(one_epoch_plan(), 18.8, clock)
    run.control.stop_margin = 11.8
    asked: list[tuple[list[float], str]] = []

    def agree(values: list[float], op: str) -> list[float]:
        asked.append((values, op))
        return [min(values[0], 6.0)] if op == "min" else values  # another rank: step 6

    run.control.agree = agree
    steps(WarmupRefit(run, plan, 0), 1.0, 5)  # type: ignore[arg-type]
    assert ([7.0], "min") in asked and plan.total_steps == 6


def test_the_warm_up_re_fit_keeps_out_of_plans_it_cannot_help(monkeypatch):
    from worker.training.optim import LrPlan
    from worker.training.refit import WarmupRefit

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def active(config: JobConfig, plan: LrPlan | None = None, done: int = 0) -> bool:
        run, default, _ = warmup_run(config, 100.0, clock)
        return WarmupRefit(run, plan or default, done).active  # type: ignore[arg-type]

    assert active(one_epoch_plan())
    # The user's epochs, no measured speed to estimate validation by, no budget.
    assert not active(JobConfig(dataset_id="ds_1", epochs=1))
    assert not active(chosen_by_recipe(1))
    no_budget, _, _ = warmup_run(one_epoch_plan(), 100.0, clock)
    no_budget.control.deadline = None
    assert not WarmupRefit(no_budget, LrPlan("cosine", 10, 1, 5), 0).active  # type: ignore[arg-type]
    # A warm-up that ends with an epoch: the epoch-end re-fit grows it in time.
    assert not active(one_epoch_plan(), LrPlan("cosine", 10, 1, 10))
    # A warm-up that ends in epoch 2 (a 3-epoch plan's): the re-fit after epoch 1 grows it.
    assert not active(chosen_by_recipe(3, plan=one_epoch_plan().plan), LrPlan("cosine", 10, 3, 15))
    # Resumed past the warm-up.
    assert not active(one_epoch_plan(), done=5)
    # A plan whose first epoch is no longer whole by the warm-up's end: left alone.
    run, plan, told = warmup_run(one_epoch_plan(), 100.0, clock)
    refit = WarmupRefit(run, plan, 0)  # type: ignore[arg-type]
    plan.replan(0.6)
    for done in range(1, 6):
        refit(done)
        clock[0] += 1.0
    assert plan.total_steps == 6 and told.plans == []
    # Two steps of warm-up (a small dataset): timed over the one after the first.
    run, plan, told = warmup_run(one_epoch_plan(), 100.0, clock)
    plan.warmup_steps = 2
    refit = WarmupRefit(run, plan, 0)  # type: ignore[arg-type]
    refit(1)
    clock[0] += 1.0
    refit(2)
    assert told.plans == [3]


def test_a_search_keeps_the_recipes_delivery_estimate_for_its_best_model():
    from worker.training.search import DELIVERY_SHARE, EXPORT_SECONDS, delivery_reserve

    planned = chosen_by_recipe(2, plan={"speed": {"estimated_delivery_seconds": 6.5}})
    assert delivery_reserve(planned, 600.0) == 6.5
    assert delivery_reserve(planned, 40.0) == pytest.approx(DELIVERY_SHARE * 40.0)  # capped
    manual = JobConfig(dataset_id="ds_1", recipe="manual")  # no recipe, no estimate
    assert delivery_reserve(manual, 600.0) == EXPORT_SECONDS


def test_an_epoch_ends_where_its_plan_says_as_it_runs():
    """`max_steps` as a callable is asked after each step: a plan shortened in the middle
    of the epoch (`WarmupRefit`) ends it there, with no stop recorded."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from worker.training.loop import train_one_epoch

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    images = TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    limit = [10]

    def after_step() -> None:
        if scheduler.last_epoch == 3:
            limit[0] = 5  # the re-fit at step 3 ends the epoch at step 5

    stats = train_one_epoch(
        model, DataLoader(images, batch_size=4), optimizer, scheduler, nn.CrossEntropyLoss(),
        torch.device("cpu"), 1, Callbacks(), after_step=after_step, max_steps=lambda: limit[0],
    )  # fmt: skip
    assert stats.steps == 5 and stats.images == 20 and not stats.stopped

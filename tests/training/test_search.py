"""Hyper-parameter search on a tiny real dataset: 100 digits at 32-40 px, two or three trials.

The searches here are given less than the API's 20 s per trial (`SearchSpec.model_construct`
skips that rule, tested in tests/unit/test_search_spec.py): a digits trial needs far less.
"""

import time

import numpy as np
import optuna
import pytest
import torch
from torch.utils.data import DataLoader

from core.jobspec import Augmentation, JobSpec
from core.search import SearchSpec
from worker.training.callbacks import Callbacks
from worker.training.data import prepare
from worker.training.loop import predict
from worker.training.search import run_search, searched_config

# `few_digits` (100 digits, ingested, a cache folder of its own): tests/training/conftest.py


class PruneAllButTheFirst(optuna.pruners.BasePruner):
    """Prunes every trial after the first at its first reported epoch past epoch 0, so which
    trials are pruned is known in advance (the default median rule itself is Optuna's)."""

    def prune(self, study, trial):
        return trial.number > 0 and (trial.last_step or 0) >= 1


class Recorder(Callbacks):
    def __init__(self, stop_after_steps=None):
        self.phases, self.epochs, self.plans = [], [], []
        self.stop_after_steps = stop_after_steps
        self.steps = 0
        self.step_times = [time.monotonic()]

    def on_phase(self, phase):
        self.phases.append(phase)

    def on_step(self, epoch, step, steps_per_epoch):
        self.steps += 1
        self.step_times.append(time.monotonic())

    def on_plan(self, epochs):
        self.plans.append(epochs)

    @property
    def slowest_step(self):
        """The longest wait between steps (a validation pass included)."""
        return float(np.diff(self.step_times).max()) if len(self.step_times) > 1 else 0.0

    def on_epoch_end(self, metrics, best):
        self.epochs.append(metrics)

    def should_stop(self):
        return self.stop_after_steps is not None and self.steps >= self.stop_after_steps


def searching(trials, budget, retrain_best=True, **overrides):
    params = dict(
        recipe="manual",
        strategy="full",
        epochs=2,
        image_size=40,
        batch_size=32,
        learning_rate=2e-3,
        seed=5,
        augmentation=Augmentation(hflip=False),
    )
    params.update(overrides)
    search = SearchSpec.model_construct(
        trials=trials, budget_seconds=float(budget), retrain_best=retrain_best
    )
    return JobSpec(**params).model_copy(update={"search": search})


class Preparer:
    """`prepare_data` for the search: the real `prepare`, counting the sizes asked for;
    `fail_first` raises on the first call (a trial that fails)."""

    def __init__(self, few_digits, fail_first=False, always_fail=False):
        self.archive, self.index, self.cache = few_digits
        self.sizes, self.fail_first, self.always_fail = [], fail_first, always_fail

    def __call__(self, spec):
        self.sizes.append(spec.input_size)
        if self.always_fail or (self.fail_first and len(self.sizes) == 1):
            raise RuntimeError(f"boom on call {len(self.sizes)}")
        return prepare(self.archive, self.index, spec, self.cache)


def sampled(result):
    """The trials' rows, without the final run's."""
    return [t for t in result.extra["search"]["trials"] if "retrains" not in t]


@pytest.fixture(scope="module")
def searched(few_digits):
    config = searching(3, 60)  # 20 s a trial: what the API accepts
    preparer, recorder = Preparer(few_digits), Recorder()
    start = time.monotonic()
    result = run_search(config, preparer, recorder, pruner=PruneAllButTheFirst(), num_workers=0)
    return config, result, preparer, recorder, time.monotonic() - start


def test_every_trial_is_listed_and_the_first_is_the_config_as_given(searched):
    config, result, _, _, seconds = searched
    search = result.extra["search"]
    trials = sampled(result)
    assert [t["number"] for t in search["trials"]] == list(range(len(search["trials"])))
    assert len(trials) >= 2 and len(search["trials"]) == len(trials) + 1  # and the final run
    assert trials[0]["params"] == {
        "learning_rate": config.learning_rate,
        "weight_decay": config.effective_weight_decay,
        "image_size": 40,
        "augmentation": "light",
        "epochs": 2,
        "strategy": "full",  # pinned by the config (not a recipe's probe): never searched
    }
    assert trials[0]["state"] == "complete" and trials[0]["best_epoch"] is not None
    for t in trials[1:]:
        assert t["params"] != trials[0]["params"]  # sampled
        assert t["params"]["image_size"] in (32, 40)
        assert t["params"]["augmentation"] in ("none", "light", "standard")
        assert 1 <= t["params"]["epochs"] <= 4
        assert 2e-4 <= t["params"]["learning_rate"] <= 2e-2
    assert search["budget_seconds"] == 60
    assert search["seconds"] == pytest.approx(seconds, abs=0.5)
    assert seconds <= 60 + 10  # the budget, and at most one slow step and evaluation past it


def test_pruned_trials_stop_after_the_epoch_that_pruned_them(searched):
    _, result, _, _, _ = searched
    later = [t for t in sampled(result)[1:] if t["best_epoch"] is not None]
    assert later, result.extra["search"]["trials"]
    for t in later:  # pruned after epoch 1 unless that was its last epoch anyway
        assert t["best_epoch"] == 1
        assert t["state"] == ("complete" if t["params"]["epochs"] == 1 else "pruned"), t
    assert any(t["state"] == "pruned" for t in later)


def test_the_best_trial_is_the_first_or_one_better_beyond_chance(searched):
    _, result, _, _, _ = searched
    trials = sampled(result)
    best = 0
    for t in trials[1:]:
        if t["value"] is None or t["value"] <= trials[best]["value"]:
            assert "against_best" not in t  # not better at all: never compared
            continue
        paired = t["against_best"]  # a higher accuracy on the same images: compared
        assert paired["trial"] == best and paired["wins"] > paired["losses"]
        beyond = paired["wins"] - paired["losses"] > (paired["wins"] + paired["losses"]) ** 0.5
        assert paired["replaced"] == beyond
        best = t["number"] if beyond else best
    final = result.extra["search"]["trials"][-1]
    assert final["compared_with"] == best
    assert final["retrains"] == best  # full fine-tuning trials: the best one's config again
    delivered = final["number"] if final["delivered"] else best
    assert result.extra["search"]["best_trial"] == delivered
    assert result.best["val_accuracy"] == result.extra["search"]["trials"][delivered]["value"]


def test_the_final_run_trains_the_best_config_for_the_time_left(searched):
    """Same config, more epochs (as many as the budget's final share fits, at most the
    recipe's 30); delivered unless it validates lower than the best trial."""
    config, result, _, recorder, seconds = searched
    rows = result.extra["search"]["trials"]
    final, best = rows[-1], rows[rows[-1]["retrains"]]
    assert final["state"] == "complete" and final["best_epoch"] is not None
    assert {k: v for k, v in final["params"].items() if k != "epochs"} == {
        k: v for k, v in best["params"].items() if k != "epochs"
    }
    # More than it ran; at most twice the config's (a manual recipe's epochs: the most the
    # trials may sample).
    assert best["epochs_run"] < final["params"]["epochs"] <= 2 * config.epochs
    assert final["epochs_run"] >= 1
    assert final["delivered"] == (final["value"] >= best["value"])
    assert any(p.startswith("search: final run") for p in recorder.phases)
    assert seconds <= config.search.budget_seconds + 10


def _trial(right: list[bool], targets: torch.Tensor | None = None, multilabel: bool = False):
    """A FitResult whose delivered model got `right` of the validation images right."""
    from worker.training.fit import FitResult

    targets = torch.arange(len(right)) % 3 if targets is None else targets
    predicted = torch.where(torch.tensor(right), targets, (targets + 1) % 3)
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    value = sum(right) / len(right)
    extra = {"task": "multi-label"} if multilabel else {}
    best = {"val_accuracy": value}
    return value, FitResult(
        torch.nn.Identity(),
        ["a", "b", "c"],
        [],
        best,
        extra=extra,
        held_out_logits=(logits, targets),
    )


def test_a_trial_replaces_the_best_only_with_a_lead_beyond_chance():
    from worker.training.search_select import Best, replaces

    first = [i < 200 for i in range(300)]  # 200 of 300 right
    value, result = _trial(first)
    best = Best(0, value, result, JobSpec())
    one_more = [i < 201 for i in range(300)]  # +1 image, no loss: chance
    assert replaces(*_trial(one_more), best) == (False, {"trial": 0, "wins": 1, "losses": 0})
    swapped = [10 <= i < 230 for i in range(300)]  # 30 won, 10 lost: 20 > sqrt(40)
    assert replaces(*_trial(swapped), best) == (True, {"trial": 0, "wins": 30, "losses": 10})
    close = [10 <= i < 215 for i in range(300)]  # 15 won, 10 lost: 5 < sqrt(25)
    assert replaces(*_trial(close), best)[0] is False
    assert replaces(*_trial(first[:199] + [False] * 101), best) == (False, {})  # not higher
    # Not the same validation images, or multi-label: the higher value wins.
    other = torch.arange(300) % 2
    assert replaces(*_trial(one_more, targets=other), best) == (True, {})
    assert replaces(*_trial(one_more, multilabel=True), best) == (True, {})


def test_the_returned_model_is_the_best_trials(searched, few_digits):
    config, result, _, _, _ = searched
    best = result.extra["search"]["trials"][result.extra["search"]["best_trial"]]
    chosen = searched_config(config, result)
    assert chosen.input_size == best["params"]["image_size"]
    assert chosen.learning_rate == best["params"]["learning_rate"]
    assert chosen.search == config.search  # the job's own fields stay the job's
    archive, index, cache = few_digits
    data = prepare(archive, index, chosen, cache)
    loader = DataLoader(data.val_set(chosen), batch_size=64)
    logits, targets = predict(result.model, loader, torch.device("cpu"))
    accuracy = float((logits.argmax(1) == targets).float().mean())
    assert accuracy == pytest.approx(best["value"], abs=1e-6)


def test_trials_at_one_input_size_share_its_prepared_data(searched):
    _, result, preparer, _, _ = searched
    sizes = {t["params"]["image_size"] for t in result.extra["search"]["trials"]}
    assert sorted(preparer.sizes) == sorted(sizes)  # once per size, never again


def test_progress_names_the_trial_and_the_metrics_are_the_best_trials(searched):
    _, result, _, recorder, _ = searched
    assert "search: trial 1/3: training" in recorder.phases
    trials = len(sampled(result))
    assert any(p.startswith(f"search: trial {trials}/3") for p in recorder.phases)
    assert recorder.epochs == result.history  # only the delivered model's epochs
    # Each run (the trials', the final run's) told the job's progress its epochs as it
    # began, in order: a trial of 4 epochs is not shown as "epoch 4 of 2".
    told = iter(recorder.plans)
    runs = [
        t for t in result.extra["search"]["trials"] if t.get("state") not in ("skipped", "failed")
    ]
    assert all(any(p == t["params"]["epochs"] for p in told) for t in runs), recorder.plans


def test_a_failed_trial_is_recorded_and_the_search_keeps_to_its_budget(few_digits):
    """The first trial fails; the second would train 200 epochs, but the budget ends it.
    No final run (`retrain_best` off): the trials have the whole budget."""
    config, recorder = searching(2, 14, retrain_best=False, epochs=200), Recorder()
    start = time.monotonic()
    result = run_search(config, Preparer(few_digits, fail_first=True), recorder, num_workers=0)
    elapsed = time.monotonic() - start
    first, second = result.extra["search"]["trials"]
    assert first["state"] == "failed" and "boom on call 1" in first["error"]
    assert second["state"] == "complete" and result.extra["search"]["best_trial"] == 1
    assert len(result.history) < 200
    # Past the budget: at most the step under way when it ran out, and the evaluation.
    assert elapsed <= 14 + 2 * recorder.slowest_step + 3, (elapsed, recorder.slowest_step)


def test_when_every_trial_fails_the_first_error_is_raised(few_digits):
    with pytest.raises(RuntimeError, match="boom on call 1"):
        run_search(searching(3, 60), Preparer(few_digits, always_fail=True), num_workers=0)


def test_a_stop_request_ends_the_search_with_the_model_so_far(few_digits):
    recorder = Recorder(stop_after_steps=1)
    result = run_search(searching(3, 60), Preparer(few_digits), recorder, num_workers=0)
    trials = result.extra["search"]["trials"]
    assert [t["state"] for t in trials] == ["stopped"]
    assert result.stopped_reason == "callback" and result.stopped
    assert np.isfinite(result.report["validation"]["loss"])


def test_the_default_pruner_prunes_short_trials_after_one_finished_trial():
    """Trials of one to three epochs: after one finished trial, a trial whose first
    fine-tuning epoch is below it is pruned there; the probe (epoch 0) never is."""
    from worker.training.search import default_pruner

    study = optuna.create_study(direction="maximize", pruner=default_pruner())
    first = study.ask()
    first.report(0.60, 0)
    first.report(0.80, 1)
    study.tell(first, 0.80)
    weak = study.ask()
    weak.report(0.10, 0)
    assert not weak.should_prune()  # the probe: fine-tuning may lift it
    weak.report(0.50, 1)
    assert weak.should_prune()
    study.tell(weak, state=optuna.trial.TrialState.PRUNED)
    good = study.ask()
    good.report(0.85, 1)
    assert not good.should_prune()


def test_the_budget_counts_from_the_jobs_start(few_digits):
    """`started`: the search's budget began before it was called (the recipe's planning,
    a download); it ends by then + budget_seconds, everything included."""
    config, recorder = searching(3, 24, epochs=200), Recorder()
    started = time.monotonic() - 6.0  # six seconds already spent
    result = run_search(config, Preparer(few_digits), recorder, started=started, num_workers=0)
    elapsed = time.monotonic() - started
    assert result.extra["search"]["seconds"] == pytest.approx(elapsed, abs=0.5)
    states = [t["state"] for t in result.extra["search"]["trials"]]
    assert all(s in ("complete", "pruned") for s in states[:-1]), states
    assert states[-1] in ("complete", "skipped")  # the final run, when the time left fits one
    # Within the budget, but for the step under way when it ran out.
    assert elapsed <= 24 + 2 * recorder.slowest_step, (elapsed, recorder.slowest_step)


def test_a_probe_the_recipe_chose_is_searched_against_lp_ft():
    """One job's budget fitted only a linear probe; a search's may fit fine-tuning."""
    from worker.training.recipe import LP_FT_LEARNING_RATE
    from worker.training.search_space import SearchSpace

    chosen = JobSpec(strategy="linear_probe", image_size=96)
    space = SearchSpace.around(chosen)
    assert space.strategies == ("linear_probe", "lp_ft")
    assert space.learning_rate[0] < LP_FT_LEARNING_RATE < space.learning_rate[1]
    assert space.baseline(chosen)["strategy"] == "linear_probe"
    assert SearchSpace.around(JobSpec(recipe="manual", strategy="linear_probe")).strategies == ()


def test_a_refitted_probe_is_compared_by_its_held_out_validation(few_digits):
    """A probe refitted on train + validation has seen the validation labels: a search
    compares it by its logits from before the refit."""
    from worker.training.fit import fit

    archive, index, cache = few_digits
    config = JobSpec(recipe="manual", strategy="linear_probe", image_size=32, seed=3)
    assert config.refit
    result = fit(config, prepare(archive, index, config, cache), num_workers=0)
    assert result.extra["refit"]["on"] == "train+validation"
    logits, targets = result.held_out_logits
    held_out = float((logits.argmax(1) == targets).float().mean())
    assert held_out == pytest.approx(result.best["val_accuracy"], abs=1e-6)
    assert torch.equal(targets, result.val_logits[1])  # the same images, in the same order


def test_a_search_of_linear_probes_has_no_final_run(few_digits):
    """A probe's epochs are its head's, on cached features: training it again with more
    of them gains nothing, so the trials have the whole budget."""
    config = searching(2, 20, strategy="linear_probe", image_size=32, epochs=1)
    result = run_search(config, Preparer(few_digits), num_workers=0)
    rows = result.extra["search"]["trials"]
    assert len(rows) == 2 and not any("retrains" in t for t in rows), rows
    assert all(t["epochs_run"] == 0 and t["state"] == "complete" for t in rows)


class FailingFinal:
    """`fit` for the search: the real one for the trials; on call `at` (the final run, after
    `at - 1` trials) it raises (`stop=False`) or first asks the job to stop (`stop=True`)."""

    def __init__(self, at, recorder=None):
        from worker.training import fit as fit_module

        self.real, self.at, self.calls, self.recorder = fit_module.fit, at, 0, recorder

    def __call__(self, spec, data, callbacks, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            if self.recorder is None:
                raise RuntimeError("the final run broke")
            self.recorder.stop_after_steps = self.recorder.steps  # stop at its next check
        return self.real(spec, data, callbacks, **kwargs)


def test_a_failed_final_run_is_recorded_and_the_best_trial_delivered(few_digits, monkeypatch):
    from worker.training import search

    monkeypatch.setattr(search, "fit", FailingFinal(at=3))
    result = run_search(searching(2, 40), Preparer(few_digits), num_workers=0)
    rows = result.extra["search"]["trials"]
    final = rows[-1]
    assert final["state"] == "failed" and "the final run broke" in final["error"], final
    assert final["delivered"] is False and "retrains" in final
    assert result.extra["search"]["best_trial"] == final["compared_with"] < final["number"]


def test_a_stop_request_during_the_final_run_ends_the_search(few_digits, monkeypatch):
    from worker.training import search

    recorder = Recorder()
    monkeypatch.setattr(search, "fit", FailingFinal(at=3, recorder=recorder))
    result = run_search(searching(2, 40), Preparer(few_digits), recorder, num_workers=0)
    final = result.extra["search"]["trials"][-1]
    assert final["state"] == "stopped" and final["stopped_reason"] == "callback", final
    assert result.stopped_reason == "callback"


def test_when_a_probe_wins_the_final_run_trains_the_best_trial_that_fine_tuned(monkeypatch):
    """The recipe chose a probe and the trials' shares fitted only a part of an lp_ft
    epoch: the time kept for the final run trains that lp_ft config longer, and it is
    delivered only if it validates at least as high as the probe."""
    from worker.training import search
    from worker.training.search_final import Candidate, EpochClock
    from worker.training.search_select import Best

    config = JobSpec(recipe="auto", strategy="linear_probe", image_size=32, epochs=1)
    config = config.model_copy(update={"search": SearchSpec(trials=2, budget_seconds=60)})
    trained = []

    def fake_fit(spec, data, callbacks, **kwargs):
        trained.append(spec)
        return _trial([i < 95 for i in range(100)])[1]  # validates at 0.95

    monkeypatch.setattr(search, "fit", fake_fit)
    run = search.Search(config, lambda spec: None, Callbacks(), None, {})
    probe, lp_ft = config.model_copy(), config.model_copy(update={"strategy": "lp_ft"})
    run.best = Best(0, 0.9, _trial([i < 90 for i in range(100)])[1], probe, None)
    run.tuned = Candidate(1, 0.8, lp_ft, EpochClock(fixed=5.0, per_epoch=2.0, epochs=0))
    run.final(2)
    row = run.rows[-1]
    assert trained[0].strategy == "lp_ft" and trained[0].epochs > 1
    assert row["retrains"] == 1 and row["compared_with"] == 0 and row["delivered"] is True
    assert run.best.number == 2 and run.best.value == 0.95

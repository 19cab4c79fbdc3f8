"""`search` in a job request: a budget too small for one trial is a 422 that says so.

The requests go through the real jobs router and the service's validation handler; only
what sits behind validation (the caller's key, the database) is stubbed.
"""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.errors import ErrorCode, ServiceError
from core.jobspec import JobCreate
from core.search import MIN_TRIAL_SECONDS, SearchSpec
from core.tenancy import ANONYMOUS, Limits
from service import deps
from service.errors import install_error_handlers
from service.routes import jobs as jobs_route


@pytest.fixture
def client(monkeypatch):
    """The jobs router alone. A request that passes validation reaches `submit_job`, which
    records the body and answers 404 (no database here)."""
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(jobs_route.router)
    app.dependency_overrides[deps._principal] = lambda: ANONYMOUS
    app.dependency_overrides[deps._limits] = lambda: Limits(1, 1, 1, 3600.0, 60)
    app.dependency_overrides[deps._session] = lambda: None
    submitted: list[JobCreate] = []

    def submit_job(session, principal, limits, body, settings, client):
        submitted.append(body)
        raise ServiceError(ErrorCode.DATASET_NOT_FOUND, "no database in this test")

    monkeypatch.setattr(jobs_route.jobs, "submit_job", submit_job)
    c = TestClient(app)
    c.submitted = submitted
    return c


def post(client, search):
    return client.post("/v1/jobs", json={"dataset_id": "ds_1", "search": search})


def test_a_budget_too_small_for_one_trial_is_a_422_saying_so(client):
    resp = post(client, {"trials": 8, "budget_seconds": 60})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error_code"] == "VALIDATION_ERROR"
    detail = body["detail"]
    assert detail.startswith("search: ")
    assert "budget_seconds=60 is too small for one trial" in detail
    assert "8 trials would get 7.5 s each" in detail
    assert f"at least {MIN_TRIAL_SECONDS:g} s" in detail
    assert "raise budget_seconds to at least 160 or ask for at most 3 trials" in detail
    assert client.submitted == []


def test_a_budget_short_of_two_trials_only_suggests_a_larger_budget(client):
    detail = post(client, {"trials": 4, "budget_seconds": 30}).json()["detail"]
    assert detail.endswith("raise budget_seconds to at least 80")  # one trial is no search


def test_a_budget_that_fits_every_trial_is_accepted(client):
    resp = post(client, {"trials": 8, "budget_seconds": 8 * MIN_TRIAL_SECONDS})
    assert resp.status_code == 404 and resp.json()["error_code"] == "DATASET_NOT_FOUND"
    (body,) = client.submitted
    assert body.search == SearchSpec(trials=8, budget_seconds=160)


def test_no_search_is_the_default(client):
    client.post("/v1/jobs", json={"dataset_id": "ds_1"})
    assert client.submitted[0].search is None


@pytest.mark.parametrize(
    "search, named",
    [
        ({"trials": 1, "budget_seconds": 600}, "search.trials"),
        ({"trials": 65, "budget_seconds": 6000}, "search.trials"),
        ({"trials": 4}, "search.budget_seconds"),
        ({"trials": 4, "budget_seconds": 600, "sampler": "grid"}, "search.sampler"),
    ],
)
def test_other_bad_searches_are_a_422_naming_the_field(client, search, named):
    resp = post(client, search)
    assert resp.status_code == 422, resp.text
    assert named in resp.json()["detail"]


def test_the_final_run_reads_epochs_off_the_best_trials_clock():
    """`search_final.EpochClock`: seconds before the fine-tuning loop and per epoch, from
    the fit's start, each epoch's (end, share of its steps) and the loop's start (epoch 0:
    lp_ft's probe)."""
    from worker.training.recipe import EPOCHS_CAP
    from worker.training.search_final import EpochClock

    def ends(*pairs, cut=1.0):  # (epoch, end) pairs, the last epoch `cut` short
        out = [(e, t, 1.0) for e, t in pairs]
        return out[:-1] + [(*out[-1][:2], cut)]

    lp_ft = EpochClock.measure(0.0, ends((0, 10.0), (1, 13.0), (2, 16.0), (3, 19.0)))
    assert lp_ft == EpochClock(fixed=10.0, per_epoch=3.0, epochs=3)
    assert EpochClock.measure(0.0, ends((0, 10.0), (1, 13.0))) == EpochClock(10.0, 3.0, 1)
    # One epoch: timed from the loop's start, the set-up after the probe counted as fixed.
    assert EpochClock.measure(0.0, ends((0, 10.0), (1, 16.0)), 13.0) == EpochClock(13.0, 3.0, 1)
    full = EpochClock.measure(1.0, ends((1, 5.0), (2, 8.0)), 2.0)  # no probe
    assert full == EpochClock(1.0, 3.0, 2)
    # An epoch the time budget cut at a quarter: a quarter of an epoch, not a whole one.
    cut = EpochClock.measure(0.0, ends((0, 10.0), (1, 11.0), cut=0.25), 10.0)
    assert cut == EpochClock(10.0, 4.0, 0)
    later_cut = EpochClock.measure(0.0, ends((0, 10.0), (1, 13.0), (2, 14.5), cut=0.5), 10.0)
    assert later_cut == EpochClock(10.0, 3.0, 1)
    assert EpochClock.measure(0.0, ends((0, 10.0))) is None  # no fine-tuning epoch
    assert lp_ft.epochs_in(40.0) == 10 and lp_ft.epochs_in(41.6) == 11  # rounded
    assert lp_ft.epochs_in(5.0) == 0 and lp_ft.epochs_in(1e6) == EPOCHS_CAP
    assert lp_ft.epochs_in(1e6, cap=4) == 4


def test_the_final_run_plans_more_epochs_than_its_trial_ran_or_says_why_not():
    from core.jobspec import JobSpec
    from worker.training.search_final import Candidate, EpochClock, plan_final

    trial = Candidate(2, 0.9, JobSpec(epochs=2, warmup_epochs=1.0), EpochClock(10.0, 3.0, 2))
    spec, why = plan_final(trial, 40.0, 30, warmup_follows=True)
    assert spec is not None and spec.epochs == 10 and spec.warmup_epochs == 2.0 and not why
    assert spec.time_budget_seconds == 40.0
    kept, _ = plan_final(trial, 40.0, 30, warmup_follows=False)  # the user's warm-up
    assert kept is not None and kept.warmup_epochs == 1.0
    capped = plan_final(trial, 40.0, 2, True)
    assert capped == (None, "40 s left fit 2 fine-tuning epochs; trial 3 ran 2")
    none, why = plan_final(None, 40.0, 30, True)
    assert none is None and "no trial ran a fine-tuning epoch" in why
    short, why = plan_final(trial, 4.0, 30, True)  # under a fit's least budget
    assert short is None and "4 s left" in why


def test_the_final_run_is_on_unless_turned_off():
    assert SearchSpec(trials=4, budget_seconds=200).retrain_best is True
    assert SearchSpec(trials=4, budget_seconds=200, retrain_best=False).retrain_best is False

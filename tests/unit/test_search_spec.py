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

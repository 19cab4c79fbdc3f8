"""The job list's fast path (service/fastpath.py) serves only parameters the FastAPI route
would read the same way; everything else falls through to the route (None here)."""

from __future__ import annotations

import time

import pytest

from service.fastpath import list_args
from worker.training.callbacks import Callbacks
from worker.training.search_callbacks import TrialCallbacks

DEFAULTS = {"status": None, "dataset_id": None, "limit": 50, "offset": 0, "after": None}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", {}),
        (b"limit=20", {"limit": 20}),
        (b"limit=05", {"limit": 5}),  # as pydantic reads it
        (b"limit=%32%30", {"limit": 20}),
        (b"status=failed&limit=20&offset=3000", {"status": "failed", "limit": 20, "offset": 3000}),
        (b"dataset_id=ds_abc", {"dataset_id": "ds_abc"}),
        (b"after=123~job_1", {"after": "123~job_1"}),
        (b"unknown=1&limit=3", {"limit": 3}),  # the route ignores unknown parameters too
    ],
)
def test_valid_parameters_are_read_as_the_route_reads_them(query, expected):
    assert list_args(query) == {**DEFAULTS, **expected}


@pytest.mark.parametrize(
    "query",
    [
        b"limit=0", b"limit=501", b"limit=", b"limit=abc", b"limit=+5", b"limit=%205",
        b"limit=5.0", b"limit=5_0", "limit=\u0665".encode(), b"limit=%D9%A5", b"offset=-1",
        b"offset=1000000001", b"status=nope", b"status=", b"dataset_id=a%20b",
        b"dataset_id=" + b"a" * 101, b"after=zz", b"limit=1&limit=2", b"a", b"limit",
        b"a&&b",
    ],
)  # fmt: skip
def test_anything_else_falls_through_to_the_route(query):
    assert list_args(query) is None


def test_a_search_deadline_never_abandons_a_probe_feature_pass_but_a_cancel_does():
    class Job(Callbacks):
        canceled = False

        def should_stop(self) -> bool:
            return self.canceled

    job = Job()
    trial = TrialCallbacks(job, None, "trial 0", deadline=time.monotonic() - 1)
    assert trial.should_stop() and trial.out_of_time  # a step-wise phase stops at once
    assert not trial.should_abandon()  # the feature pass goes on: the probe needs it
    job.canceled = True
    assert trial.should_abandon() and trial.canceled

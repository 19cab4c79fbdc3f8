"""The job poll's and list's fast paths serialise `job_public_data` without building a
`JobPublic` per job: the bytes must be exactly what the models would write, whatever a
row holds (naive or aware datetimes, ints where floats are declared, NaN in metrics, an
error, warnings, nested config)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from pydantic_core import to_json

from service import schemas
from service.schemas import JobsPublic, job_public, job_public_data

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=timezone.utc)


def row(**overrides):
    fields = dict(
        id="j" * 32,
        dataset_id="d" * 32,
        status="queued",
        config={"epochs": 5, "lr": 1e-3, "augmentation": {"ops": [{"name": "hflip"}]}},
        created_at=datetime(2026, 11, 29, 11, 0, 0),  # naive, as SQLite hands it back
        started_at=None,
        finished_at=None,
        heartbeat_at=None,
        attempts=0,
        cancel_requested=False,
        checkpoint_key=None,
        phase=None,
        epoch=0,
        total_epochs=None,
        step=0,
        total_steps=None,
        eta_seconds=None,
        progress_at=None,
        latest_metrics=None,
        best_metrics=None,
        error_code=None,
        error_message=None,
        result=None,
    )
    return SimpleNamespace(**{**fields, **overrides})


ROWS = {
    "queued": row(),
    "running": row(
        status="running",
        started_at=NOW - timedelta(minutes=5),
        heartbeat_at=datetime(2026, 11, 29, 11, 59, 57, 250000),
        attempts=2,
        checkpoint_key="ckpt/x",
        phase="training",
        epoch=3,
        total_epochs=8,
        step=17,
        total_steps=40,
        eta_seconds=12,  # an int where the model declares a float
        progress_at=NOW,
        latest_metrics={"val_accuracy": 0.5, "train_loss": float("nan")},
        best_metrics={"val_accuracy": 0.875, "epoch": 2},
    ),
    "succeeded": row(
        status="succeeded",
        finished_at=NOW,
        total_steps=0,
        result={"bundle_key": "b", "warnings": ["the time budget ended training"]},
        best_metrics={"val_accuracy": 1.0, "inf": float("inf")},
    ),
    "failed": row(status="failed", error_code="invalid_data", error_message=None),
}


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr(schemas, "utcnow", lambda: NOW)


@pytest.mark.parametrize("name", list(ROWS))
def test_a_job_serialises_as_the_model_would(name):
    data = job_public_data(ROWS[name])
    model = job_public(ROWS[name])
    assert to_json(data, inf_nan_mode="null") == model.model_dump_json(by_alias=True).encode()


def test_a_page_serialises_as_the_model_would():
    rows = list(ROWS.values())
    fast = to_json(
        {"data": [job_public_data(r) for r in rows], "count": 4, "next_cursor": "abc"},
        inf_nan_mode="null",
    )
    page = JobsPublic(data=[job_public(r) for r in rows], count=4, next_cursor="abc")
    assert fast == page.model_dump_json(by_alias=True).encode()
    # and the model's field names are the data's: one definition
    assert list(job_public_data(rows[0])) == list(schemas.JobPublic.model_fields)

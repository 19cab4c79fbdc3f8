"""How the worker classifies a failure decides whether a job is retried; how an attempt
ends is decided in one place from what it observed."""

import pytest
import sqlalchemy.exc
import torch

from core.storage import StorageError, StorageNotFound
from worker.datasets import DatasetFilesMissing, fetch_dataset
from worker.ending import EndReason, Observed, decide_end
from worker.failures import TRANSIENT, JobLost, error_code, is_transient
from worker.training.weights import WeightsUnavailable


def test_out_of_memory_is_its_own_deterministic_code():
    assert error_code(torch.OutOfMemoryError("CUDA out of memory")) == "OUT_OF_MEMORY"
    assert not isinstance(torch.OutOfMemoryError("x"), TRANSIENT)


def test_unreachable_storage_and_database_are_transient_but_a_missing_object_is_not():
    assert isinstance(StorageError("connection refused"), TRANSIENT)
    assert isinstance(sqlalchemy.exc.OperationalError("select 1", {}, Exception("down")), TRANSIENT)
    missing = StorageNotFound("object 'x' not found")
    assert error_code(missing) == "STORAGE_UNAVAILABLE"  # recorded at once, not retried
    assert is_transient(StorageError("connection refused")) and not is_transient(missing)


def test_data_and_weights_failures_have_their_codes():
    assert error_code(ValueError("the training split is empty")) == "DATA_ERROR"
    assert error_code(WeightsUnavailable("no weights")) == "WEIGHTS_UNAVAILABLE"
    assert error_code(RuntimeError("boom")) == "TRAINING_FAILED"


class _EmptyStore:
    def get_file(self, key, dest):
        raise StorageNotFound(f"object {key!r} not found")

    def get_bytes(self, key):
        raise StorageNotFound(f"object {key!r} not found")


def test_a_dataset_whose_files_are_gone_is_a_data_error_that_says_so(tmp_path):
    from core.settings import Settings

    settings = Settings(data_dir=tmp_path)
    with pytest.raises(DatasetFilesMissing) as caught:
        fetch_dataset(
            settings, _EmptyStore(), "ds_gone", "datasets/ds_gone/images.zip", "x/index.json"
        )
    exc = caught.value
    assert error_code(exc) == "DATA_ERROR" and not is_transient(exc)
    assert "ds_gone" in str(exc) and "deleted" in str(exc) and "images.zip" in str(exc)


RETRIES = {"attempt": 1, "max_attempts": 3}


@pytest.mark.parametrize(
    "seen, reason",
    [
        (Observed(), EndReason.SUCCEEDED),
        (Observed(has_model=True), EndReason.SUCCEEDED),
        (Observed(lost=True, canceled=True, shutting_down=True), EndReason.LOST),
        (
            Observed(shutting_down=True, stopped_early=True, time_limited=True),
            EndReason.HANDED_BACK,
        ),
        # Finished every epoch before the shutdown stopped it: nothing to resume.
        (Observed(shutting_down=True, has_model=True), EndReason.SUCCEEDED),
        (
            Observed(shutting_down=True, stopped_early=True, canceled=True),
            EndReason.CANCELED_DISCARD,
        ),
        (Observed(canceled=True, has_model=True), EndReason.CANCELED_DISCARD),
        (Observed(canceled=True, keep_requested=True), EndReason.CANCELED_DISCARD),
        (Observed(canceled=True, keep_requested=True, has_model=True), EndReason.CANCELED_KEEP),
        (Observed(canceled=True, time_limited=True, has_model=True), EndReason.CANCELED_DISCARD),
        (Observed(time_limited=True, has_model=True), EndReason.TIME_LIMITED_KEPT),
        (Observed(time_limited=True), EndReason.TIME_LIMITED_EMPTY),
        (Observed(error=JobLost("x"), **RETRIES), EndReason.LOST),
        (Observed(error=StorageError("down"), **RETRIES), EndReason.TRANSIENT_RETRY),
        (Observed(error=StorageError("down"), attempt=3, max_attempts=3), EndReason.FAILED),
        (Observed(error=StorageNotFound("gone"), **RETRIES), EndReason.FAILED),
        (Observed(error=ValueError("bad"), **RETRIES), EndReason.FAILED),
    ],
)
def test_each_attempt_ends_for_exactly_one_reason(seen, reason):
    assert decide_end(seen) is reason


def test_each_end_leaves_the_status_run_job_reports():
    assert {r: r.status for r in EndReason} == {
        EndReason.SUCCEEDED: "succeeded",
        EndReason.CANCELED_DISCARD: "canceled",
        EndReason.CANCELED_KEEP: "canceled",
        EndReason.TIME_LIMITED_KEPT: "failed",
        EndReason.TIME_LIMITED_EMPTY: "failed",
        EndReason.HANDED_BACK: "interrupted",
        EndReason.LOST: "lost",
        EndReason.TRANSIENT_RETRY: "retrying",
        EndReason.FAILED: "failed",
    }

"""How the worker classifies a failure decides whether a job is retried."""

import sqlalchemy.exc
import torch

from core.storage import StorageError, StorageNotFound
from worker.tasks import TRANSIENT, _error_code
from worker.training.weights import WeightsUnavailable


def test_out_of_memory_is_its_own_deterministic_code():
    assert _error_code(torch.OutOfMemoryError("CUDA out of memory")) == "OUT_OF_MEMORY"
    assert not isinstance(torch.OutOfMemoryError("x"), TRANSIENT)


def test_unreachable_storage_and_database_are_transient_but_a_missing_object_is_not():
    assert isinstance(StorageError("connection refused"), TRANSIENT)
    assert isinstance(sqlalchemy.exc.OperationalError("select 1", {}, Exception("down")), TRANSIENT)
    missing = StorageNotFound("object 'x' not found")
    assert _error_code(missing) == "STORAGE_UNAVAILABLE"  # recorded at once, not retried


def test_data_and_weights_failures_have_their_codes():
    assert _error_code(ValueError("the training split is empty")) == "DATA_ERROR"
    assert _error_code(WeightsUnavailable("no weights")) == "WEIGHTS_UNAVAILABLE"
    assert _error_code(RuntimeError("boom")) == "TRAINING_FAILED"

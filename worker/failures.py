"""What a failure means for a job: its error code, and whether trying again can help.

Transient failures (the object store or the database briefly unreachable) hand the job back
to be retried from its checkpoint within the attempt budget; everything else is deterministic
(the same inputs would fail the same way) and fails the job at once.
"""

from __future__ import annotations

import sqlalchemy.exc
import torch

from core.errors import ErrorCode
from core.storage import StorageError, StorageNotFound
from worker.datasets import DatasetFilesMissing
from worker.training.weights import WeightsUnavailable

TRANSIENT = (StorageError, sqlalchemy.exc.OperationalError)


class JobLost(RuntimeError):
    """This worker no longer owns the job (reclaimed, canceled or finished elsewhere)."""


def is_transient(exc: BaseException) -> bool:
    # A missing object stays missing: retrying would only delay the same failure.
    return isinstance(exc, TRANSIENT) and not isinstance(exc, StorageNotFound)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        # Deterministic: the same batch size would run out again. Not retried.
        return ErrorCode.OUT_OF_MEMORY.value
    if isinstance(exc, WeightsUnavailable):
        return ErrorCode.WEIGHTS_UNAVAILABLE.value
    if isinstance(exc, DatasetFilesMissing):
        # The user's data is gone, not the store: nothing an operator can bring back up.
        return ErrorCode.DATA_ERROR.value
    if isinstance(exc, StorageError):
        return ErrorCode.STORAGE_UNAVAILABLE.value
    if isinstance(exc, (ValueError, KeyError, OSError)):
        return ErrorCode.DATA_ERROR.value
    return ErrorCode.TRAINING_FAILED.value

"""Error codes, their HTTP statuses and the one error type. No FastAPI here: the worker
records these codes on failed jobs, and `service/errors.py` renders them as HTTP bodies."""

from __future__ import annotations

from enum import Enum
from typing import Any


class ErrorCode(str, Enum):
    # (code, http status)
    VALIDATION_ERROR = "VALIDATION_ERROR"
    NOT_FOUND = "NOT_FOUND"
    DATASET_NOT_FOUND = "DATASET_NOT_FOUND"
    DATASET_NOT_ARCHIVE = "DATASET_NOT_ARCHIVE"
    DATASET_LIMIT = "DATASET_LIMIT"
    DATASET_IN_USE = "DATASET_IN_USE"
    IMPORT_NOT_ALLOWED = "IMPORT_NOT_ALLOWED"
    DATASET_EMPTY = "DATASET_EMPTY"
    DATASET_LAYOUT = "DATASET_LAYOUT"
    DATASET_TOO_FEW_CLASSES = "DATASET_TOO_FEW_CLASSES"
    DATASET_CLASS_TOO_SMALL = "DATASET_CLASS_TOO_SMALL"
    DATASET_NO_VALID_IMAGES = "DATASET_NO_VALID_IMAGES"
    UPLOAD_TOO_LARGE = "UPLOAD_TOO_LARGE"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    JOB_NOT_FINISHED = "JOB_NOT_FINISHED"
    JOB_FINISHED = "JOB_FINISHED"
    WORKER_LOST = "WORKER_LOST"
    MODEL_NOT_AVAILABLE = "MODEL_NOT_AVAILABLE"
    REPORT_NOT_AVAILABLE = "REPORT_NOT_AVAILABLE"
    PLOT_NOT_AVAILABLE = "PLOT_NOT_AVAILABLE"
    PREVIEW_FAILED = "PREVIEW_FAILED"
    UNKNOWN_BACKBONE = "UNKNOWN_BACKBONE"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INSUFFICIENT_SCOPE = "INSUFFICIENT_SCOPE"
    RATE_LIMITED = "RATE_LIMITED"
    QUEUED_JOBS_LIMIT = "QUEUED_JOBS_LIMIT"
    STORAGE_LIMIT = "STORAGE_LIMIT"
    JOB_DURATION_LIMIT = "JOB_DURATION_LIMIT"
    TENANT_NOT_FOUND = "TENANT_NOT_FOUND"
    TENANT_EXISTS = "TENANT_EXISTS"
    TENANT_DISABLED = "TENANT_DISABLED"
    TENANT_PROTECTED = "TENANT_PROTECTED"
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    # Recorded on failed jobs, not returned by routes.
    TRAINING_FAILED = "TRAINING_FAILED"
    WEIGHTS_UNAVAILABLE = "WEIGHTS_UNAVAILABLE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    TIME_LIMIT_EXCEEDED = "TIME_LIMIT_EXCEEDED"
    DATA_ERROR = "DATA_ERROR"
    INTERNAL_ERROR = "INTERNAL_ERROR"


STATUS: dict[ErrorCode, int] = {
    ErrorCode.VALIDATION_ERROR: 422,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.DATASET_NOT_FOUND: 404,
    ErrorCode.DATASET_NOT_ARCHIVE: 415,
    ErrorCode.DATASET_LIMIT: 413,
    ErrorCode.DATASET_IN_USE: 409,
    ErrorCode.IMPORT_NOT_ALLOWED: 403,
    ErrorCode.DATASET_EMPTY: 422,
    ErrorCode.DATASET_LAYOUT: 422,
    ErrorCode.DATASET_TOO_FEW_CLASSES: 422,
    ErrorCode.DATASET_CLASS_TOO_SMALL: 422,
    ErrorCode.DATASET_NO_VALID_IMAGES: 422,
    ErrorCode.UPLOAD_TOO_LARGE: 413,
    ErrorCode.JOB_NOT_FOUND: 404,
    ErrorCode.JOB_NOT_FINISHED: 409,
    ErrorCode.JOB_FINISHED: 409,
    ErrorCode.MODEL_NOT_AVAILABLE: 409,
    ErrorCode.REPORT_NOT_AVAILABLE: 409,
    ErrorCode.PLOT_NOT_AVAILABLE: 404,
    ErrorCode.PREVIEW_FAILED: 422,
    ErrorCode.WEIGHTS_UNAVAILABLE: 422,
    ErrorCode.UNKNOWN_BACKBONE: 422,
    ErrorCode.BROKER_UNAVAILABLE: 503,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.INSUFFICIENT_SCOPE: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUEUED_JOBS_LIMIT: 429,
    ErrorCode.STORAGE_LIMIT: 403,
    ErrorCode.JOB_DURATION_LIMIT: 403,
    ErrorCode.TENANT_NOT_FOUND: 404,
    ErrorCode.TENANT_EXISTS: 409,
    ErrorCode.TENANT_DISABLED: 409,
    ErrorCode.TENANT_PROTECTED: 409,
    ErrorCode.KEY_NOT_FOUND: 404,
}


class ServiceError(Exception):
    def __init__(
        self,
        code: ErrorCode,
        detail: str,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra or {}
        self.headers = headers

    @property
    def status_code(self) -> int:
        return STATUS.get(self.code, 500)

    def body(self) -> dict[str, Any]:
        return {"error_code": self.code.value, "detail": self.detail, **self.extra}

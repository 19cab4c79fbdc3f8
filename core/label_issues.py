"""A finished job's label issues as the API serves them: the training images whose label
confident learning doubts, most suspect first (found by the worker after export,
`worker/label_issues.py`, and stored as one JSON document beside the model)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from core.errors import ErrorCode, ServiceError
from core.jobs import get_owned_job
from core.models import JobStatus
from core.storage import ObjectStore, StorageNotFound
from core.tenancy import Principal


def label_issues_key(job_id: str) -> str:
    return f"jobs/{job_id}/label_issues.json"


def job_label_issues(
    session: Session, store: ObjectStore, principal: Principal, job_id: str
) -> dict[str, Any]:
    """The caller's job's label issues document (`issues`, `count`, `per_class`, `method`,
    ...). LABEL_ISSUES_NOT_AVAILABLE, saying why, while there is none to serve: the job has
    not succeeded, ran before label issues existed, or they were skipped or failed."""
    job = get_owned_job(session, principal, job_id)
    summary = ((job.result or {}).get("training") or {}).get("label_issues")
    succeeded = job.status == JobStatus.SUCCEEDED.value
    if not succeeded or summary is None:
        when = (
            "it ran before label issues were found at the end of a job"
            if succeeded
            else f"it is {job.status}; they are found when a job succeeds"
        )
        raise ServiceError(
            ErrorCode.LABEL_ISSUES_NOT_AVAILABLE, f"job {job_id} has no label issues: {when}"
        )
    why = summary.get("skipped") or summary.get("error")
    if why:
        raise ServiceError(
            ErrorCode.LABEL_ISSUES_NOT_AVAILABLE,
            f"job {job_id} has no label issues: they were not computed ({why})",
        )
    try:
        document: dict[str, Any] = json.loads(store.get_bytes(label_issues_key(job_id)))
    except StorageNotFound as exc:
        raise ServiceError(
            ErrorCode.LABEL_ISSUES_NOT_AVAILABLE,
            f"job {job_id}'s label issues are missing from the object store",
        ) from exc
    return document

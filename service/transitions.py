"""Every change of a job's status goes through here.

Each transition is one conditional UPDATE (`... WHERE id = :id AND status IN (allowed)`),
which is atomic on PostgreSQL and SQLite alike: two workers racing for the same job
cannot both win, whatever the broker redelivers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.db import utcnow
from service.models import Job, JobMetric, JobStatus

CLAIMABLE = (JobStatus.QUEUED.value, JobStatus.INTERRUPTED.value)


def _guarded(session: Session, job_id: str, allowed: tuple[str, ...], **values: Any) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(allowed))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def claim(session: Session, job_id: str, worker_id: str) -> bool:
    """queued|interrupted -> running, owned by `worker_id`. False: someone else has it."""
    now = utcnow()
    return _guarded(
        session,
        job_id,
        CLAIMABLE,
        status=JobStatus.RUNNING.value,
        worker_id=worker_id,
        heartbeat_at=now,
        started_at=now,
        attempts=Job.attempts + 1,
        phase="starting",
    )


def _owned(session: Session, job_id: str, worker_id: str, **values: Any) -> bool:
    """Update a running job only while `worker_id` still owns it."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker_id == worker_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def heartbeat(session: Session, job_id: str, worker_id: str) -> bool:
    return _owned(session, job_id, worker_id, heartbeat_at=utcnow())


def record_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    phase: str,
    epoch: int,
    total_epochs: int,
    step: int,
    total_steps: int,
    eta_seconds: float | None,
) -> bool:
    now = utcnow()
    return _owned(
        session,
        job_id,
        worker_id,
        phase=phase,
        epoch=epoch,
        total_epochs=total_epochs,
        step=step,
        total_steps=total_steps,
        eta_seconds=eta_seconds,
        progress_at=now,
        heartbeat_at=now,
    )


def record_epoch(
    session: Session,
    job_id: str,
    worker_id: str,
    metrics: dict[str, Any],
    best: dict[str, Any] | None,
) -> bool:
    """Append the epoch's metrics row and update the job's latest/best in one transaction."""
    epoch = int(metrics["epoch"])
    session.add(
        JobMetric(
            job_id=job_id,
            epoch=epoch,
            train_loss=metrics["train_loss"],
            train_accuracy=metrics.get("train_accuracy"),
            val_loss=metrics.get("val_loss"),
            val_accuracy=metrics.get("val_accuracy"),
            learning_rate=metrics.get("learning_rate"),
            images_per_second=metrics.get("images_per_second"),
            epoch_seconds=metrics.get("epoch_seconds"),
            phase=metrics.get("phase"),
            val_top5_accuracy=metrics.get("val_top5_accuracy"),
            val_macro_f1=metrics.get("val_macro_f1"),
            loader_images_per_second=metrics.get("loader_images_per_second"),
        )
    )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker_id == worker_id)
        .values(latest_metrics=metrics, best_metrics=best, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    session.commit()
    return True


def succeed(session: Session, job_id: str, worker_id: str, result: dict[str, Any]) -> bool:
    now = utcnow()
    return _owned(
        session,
        job_id,
        worker_id,
        status=JobStatus.SUCCEEDED.value,
        result=result,
        finished_at=now,
        heartbeat_at=now,
        phase="done",
        eta_seconds=0.0,
    )


def fail(
    session: Session,
    job_id: str,
    *,
    code: str,
    message: str,
    traceback: str | None = None,
    worker_id: str | None = None,
    finished_at: datetime | None = None,
) -> bool:
    """-> failed. From the owning worker (running) or from the API (queued, send failed)."""
    values: dict[str, Any] = dict(
        status=JobStatus.FAILED.value,
        error_code=code,
        error_message=message[:4000],
        error_traceback=traceback,
        finished_at=finished_at or utcnow(),
        eta_seconds=None,
    )
    if worker_id is not None:
        return _owned(session, job_id, worker_id, **values)
    return _guarded(session, job_id, CLAIMABLE, **values)

"""Every change of a job's status goes through here.

Each transition is one conditional UPDATE (`... WHERE id = :id AND status IN (allowed)`),
which is atomic on PostgreSQL and SQLite alike: two workers racing for the same job
cannot both win, whatever the broker redelivers.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from core import registry
from core.db import utcnow
from core.models import Job, JobMetric, JobStatus, Tenant
from core.settings import Settings
from core.tenancy import count_jobs, tenant_limits

CLAIMABLE = (JobStatus.QUEUED.value, JobStatus.INTERRUPTED.value)
ENDED = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELED.value)
WAITING_FOR_SLOT = "waiting_for_slot"  # phase of a job whose tenant is at its running limit


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


def claim_within_limit(
    session: Session, job_id: str, worker_id: str, settings: Settings
) -> tuple[str, int]:
    """Claim the job unless its tenant already runs its `max_running_jobs`. Returns
    ("claimed" | "taken" | "deferred", the limit). Claims of one tenant are serialized by
    locking its row (PostgreSQL; SQLite serializes writers anyway), so two workers cannot
    both take the last slot."""
    row = session.execute(select(Job.tenant_id, Job.status).where(Job.id == job_id)).first()
    if row is None or row.status not in CLAIMABLE:
        return "taken", 0
    limit = tenant_limits(session, row.tenant_id, settings).max_running_jobs
    session.execute(select(Tenant.id).where(Tenant.id == row.tenant_id).with_for_update())
    if count_jobs(session, row.tenant_id, (JobStatus.RUNNING.value,)) >= limit:
        session.rollback()
        return "deferred", limit
    return ("claimed" if claim(session, job_id, worker_id) else "taken"), limit


def defer(session: Session, job_id: str) -> bool:
    """Still waiting for a slot of its tenant: the phase says so; the heartbeat time stamps
    the deferral, so the reaper can resend the job if its delayed message is lost."""
    return _guarded(session, job_id, CLAIMABLE, phase=WAITING_FOR_SLOT, heartbeat_at=utcnow())


def _owned(session: Session, job_id: str, worker_id: str, then: Any = None, **values: Any) -> bool:
    """While `worker_id` owns the running job: update it, `then(session, job_id)`, commit."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker_id == worker_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    done = bool(result.rowcount == 1)  # type: ignore[attr-defined]
    if done and then is not None:
        then(session, job_id)
    session.commit()
    return done


def heartbeat(session: Session, job_id: str, worker_id: str) -> bool:
    return _owned(session, job_id, worker_id, heartbeat_at=utcnow())


def record_plan(session: Session, job_id: str, worker_id: str, config: dict[str, Any]) -> bool:
    """The auto recipe's resolved config (with its `plan`), and the epochs it plans."""
    return _owned(session, job_id, worker_id, config=config, total_epochs=config["epochs"])


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def request_cancel(session: Session, job_id: str, mode: str) -> str | None:
    """A queued (or interrupted) job is canceled at once: it never starts. A running job is
    flagged; its worker stops at the next step. Returns the status after, None if finished."""
    now = utcnow()
    if _guarded(
        session,
        job_id,
        CLAIMABLE,
        status=JobStatus.CANCELED.value,
        cancel_requested=True,
        cancel_mode=mode,
        finished_at=now,
        eta_seconds=None,
        phase="canceled",
    ):
        return JobStatus.CANCELED.value
    if _guarded(
        session, job_id, (JobStatus.RUNNING.value,), cancel_requested=True, cancel_mode=mode
    ):
        return JobStatus.RUNNING.value
    return None


def finish_canceled(
    session: Session, job_id: str, worker_id: str, result: dict[str, Any] | None
) -> bool:
    return _finish(session, job_id, worker_id, JobStatus.CANCELED, result)


def set_checkpoint(session: Session, job_id: str, worker_id: str, key: str) -> bool:
    return _owned(session, job_id, worker_id, checkpoint_key=key, heartbeat_at=utcnow())


def release(
    session: Session, job_id: str, worker_id: str, reason: str, ran_seconds: float = 0.0
) -> bool:
    """running -> interrupted by its own worker (shutting down, or a transient failure):
    to be resumed, here or elsewhere. `ran_seconds` counts toward the job's time limit."""
    return _owned(
        session,
        job_id,
        worker_id,
        status=JobStatus.INTERRUPTED.value,
        phase="interrupted",
        error_message=reason,
        run_seconds=Job.run_seconds + max(0.0, ran_seconds),
    )


def checkpoint_prefix(job_id: str) -> str:
    """Where a job's checkpoints are stored, one key per attempt; gone once the job ends."""
    return f"jobs/{job_id}/checkpoints/"


def ended_with_checkpoints(session: Session, limit: int = 100) -> list[str]:
    """Ended jobs whose row still points at checkpoints: ended away from their worker (the
    reaper, the hard limit, a cancel while interrupted) or their worker's delete failed."""
    found = select(Job.id).where(Job.status.in_(ENDED), Job.checkpoint_key.is_not(None))
    return list(session.scalars(found.limit(limit)).all())


def forget_checkpoints(session: Session, job_id: str) -> bool:
    """An ended job's checkpoints are deleted from the store: the row stops pointing there."""
    return _guarded(session, job_id, ENDED, checkpoint_key=None)


def resend_long_queued(session: Session, older_than_seconds: float) -> list[str]:
    """Queued jobs nobody has claimed for `older_than_seconds` since they were sent (or last
    resent): their message may have been lost (a broker restarted without persistence).
    Stamped, so each is resent at most once per period; a duplicate is harmless (the claim
    lets one copy train, the other exits). Returns the ids to send again."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    due = and_(
        Job.status == JobStatus.QUEUED.value,
        or_(Job.phase.is_(None), Job.phase != WAITING_FOR_SLOT),
        func.coalesce(Job.resent_at, Job.created_at) < cutoff,
    )
    resend: list[str] = []
    for job_id in session.scalars(select(Job.id).where(due).limit(1000)).all():
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, due)
            .values(resent_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if result.rowcount == 1:  # type: ignore[attr-defined]
            resend.append(job_id)
    return resend


def reap_stale(
    session: Session, stale_after_seconds: float, max_attempts: int
) -> tuple[list[str], list[str]]:
    """Jobs whose worker stopped heartbeating: back to `interrupted` for another attempt,
    or `failed` once `max_attempts` are spent. Returns (requeue, failed) job ids."""
    cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
    stale = session.execute(
        select(Job.id, Job.attempts, Job.started_at, Job.heartbeat_at).where(
            Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < cutoff
        )
    ).all()
    requeue: list[str] = []
    failed: list[str] = []
    # Interrupted or slot-waiting jobs nobody claimed within a stale period (their delayed
    # message was lost with a worker that held it, or with a broker restart): resend them.
    waiting = or_(
        Job.status == JobStatus.INTERRUPTED.value,
        and_(Job.status == JobStatus.QUEUED.value, Job.phase == WAITING_FOR_SLOT),
    )
    orphaned = session.scalars(select(Job.id).where(waiting, Job.heartbeat_at < cutoff)).all()
    for job_id in orphaned:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                waiting,
                Job.heartbeat_at < cutoff,
            )
            .values(heartbeat_at=utcnow())  # resent at most once per stale period
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if result.rowcount == 1:  # type: ignore[attr-defined]
            requeue.append(job_id)
    for job_id, attempts, started_at, last_beat in stale:
        still_stale = (Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < cutoff)
        # The lost attempt ran until its last sign of life: that counts toward the limit.
        ran = (last_beat - started_at).total_seconds() if started_at and last_beat else 0.0
        if attempts >= max_attempts:
            values: dict[str, Any] = dict(
                status=JobStatus.FAILED.value,
                error_code="WORKER_LOST",
                error_message=(
                    f"the worker stopped heartbeating (no sign of life for over "
                    f"{stale_after_seconds:.0f}s) on attempt {attempts} of {max_attempts}; "
                    "giving up"
                ),
                finished_at=utcnow(),
                eta_seconds=None,
            )
        else:
            values = dict(
                status=JobStatus.INTERRUPTED.value,
                worker_id=None,
                phase="interrupted",
                run_seconds=Job.run_seconds + max(0.0, ran),
            )
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, *still_stale)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if result.rowcount == 1:  # type: ignore[attr-defined]
            (failed if attempts >= max_attempts else requeue).append(job_id)
    return requeue, failed


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
    # A resumed attempt may redo an epoch whose row the lost attempt had written.
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.epoch == epoch))
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
    return _finish(session, job_id, worker_id, JobStatus.SUCCEEDED, result)


def finish_time_limited(
    session: Session, job_id: str, worker_id: str, result: dict[str, Any] | None, message: str
) -> bool:
    """Stopped at its soft time limit: `failed TIME_LIMIT_EXCEEDED`, keeping the best model
    trained so far (when an epoch finished) as its result."""
    return _finish(
        session,
        job_id,
        worker_id,
        JobStatus.FAILED,
        result,
        error_code="TIME_LIMIT_EXCEEDED",
        error_message=message,
    )


def _finish(
    session: Session,
    job_id: str,
    worker_id: str,
    status: JobStatus,
    result: dict[str, Any] | None,
    **error: Any,
) -> bool:
    now = utcnow()
    return _owned(
        session,
        job_id,
        worker_id,
        status=status.value,
        result=result,
        finished_at=now,
        heartbeat_at=now,
        phase="done" if status == JobStatus.SUCCEEDED else status.value,
        eta_seconds=0.0 if status == JobStatus.SUCCEEDED else None,
        then=registry.register if status == JobStatus.SUCCEEDED else None,
        **error,
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

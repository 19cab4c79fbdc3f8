"""One training attempt, as a sequence of small steps:

    claim -> fetch -> plan -> prepare -> fit (or search) -> export -> publish -> finish

`claim` takes the job by a guarded transition (or defers it, or leaves it to whoever has it);
`fetch` brings the dataset and any checkpoint to local disk; `plan` runs the auto recipe once
and records it on the job row (`worker/planning.py`); `prepare` decodes the images; `fit`
trains (worker/training, no DB), or `search` runs its trials around it; `export` writes the
model files; `publish` uploads them;
`finish` records the one `EndReason` that `worker.ending.decide_end` chose.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
import uuid
from functools import partial
from typing import Any

from sqlalchemy import select

from core import transitions, webhook_store
from core.db import session_scope
from core.jobspec import ConfigInvalid, JobConfig, parse_job_config
from core.models import Dataset, Job
from core.queue import send_train
from core.settings import Settings, get_settings
from core.transitions import checkpoint_prefix
from worker import cache, metrics
from worker.attempt import Attempt, Claim, Trained, begin
from worker.celery_app import SHUTTING_DOWN
from worker.datasets import fetch_dataset
from worker.delivery import export, publish
from worker.ending import EndReason, Observed, decide_end
from worker.failures import JobLost, error_code, is_transient
from worker.label_issues import label_issues
from worker.planning import budget_deadline, choose_recipe
from worker.training import scratch
from worker.training.checkpoint import CheckpointRefused, load_checkpoint
from worker.training.data import prepare
from worker.training.distributed import fit_distributed
from worker.training.fit import fit
from worker.training.search import run_search, searched_config
from worker.training.weights import WeightsSource

log = logging.getLogger(__name__)


def run_job(job_id: str, settings: Settings | None = None, worker_id: str | None = None) -> str:
    """Train job `job_id` if this worker can claim it. Returns the job's status as this
    worker leaves it ("succeeded", "failed", "canceled", "interrupted", "retrying", "lost",
    "deferred", or the status of a job it did not claim)."""
    settings = settings or get_settings()
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    claimed = claim(job_id, worker_id, settings)
    if isinstance(claimed, str):
        return claimed
    webhook_store.announce(settings, job_id)  # job.running (then how it ended, below)
    run = begin(claimed, worker_id, settings)
    metrics.job_started()
    started, status = time.monotonic(), "error"
    try:
        with cache.in_use(settings, claimed.dataset_id):  # not evicted while the job reads it
            status = run_attempt(run)
            return status
    finally:
        metrics.job_finished(status, time.monotonic() - started)
        run.heartbeat.stopped.set()
        scratch.release(run.workdir)
        webhook_store.announce(settings, job_id)


def claim(job_id: str, worker_id: str, settings: Settings) -> Claim | str:
    """The job, now owned by this worker; or the status to return without running it."""
    with session_scope(settings) as s:
        claimed, limit = transitions.claim_within_limit(s, job_id, worker_id, settings)
        if claimed == "deferred":
            transitions.defer(s, job_id)
            send_train(job_id, settings, countdown=settings.tenant_slot_retry_seconds)
            log.info("job %s waits: its tenant runs %d jobs, its limit", job_id, limit)
            return "deferred"
        job = s.get(Job, job_id)
        if claimed != "claimed":
            log.info("job %s not claimed (status %s)", job_id, job.status if job else "missing")
            return job.status if job else "missing"
        assert job is not None
        ds = s.get(Dataset, job.dataset_id)
        assert ds is not None
        try:
            config: JobConfig | ConfigInvalid = parse_job_config(job.config)
        except ConfigInvalid as exc:  # deterministic: refused, never silently trimmed
            config = exc
        return Claim(
            job_id=job_id,
            config=config,
            dataset_id=ds.id,
            archive_key=ds.archive_key,
            index_key=ds.index_key,
            checkpoint_key=job.checkpoint_key,
            dataset_sha=job.config.get("dataset_sha256"),
            max_duration=float(
                job.config.get("max_duration_seconds") or settings.job_max_duration_seconds
            ),
            prior_seconds=job.run_seconds or 0.0,
            attempt=job.attempts,
        )


def run_attempt(run: Attempt) -> str:
    """Train, then record how the attempt ended. A failure while exporting or recording is
    itself an end, decided the same way."""
    try:
        if isinstance(run.claim.config, ConfigInvalid):
            raise run.claim.config  # fails at once, before any lease or download
        run.heartbeat.start()
        trained = train(run, run.claim.config)
        seen = observe(run, trained)
    except Exception as exc:
        trained, seen = None, run.observed(error=exc)
    try:
        return finish(run, decide_end(seen), seen, trained)
    except Exception as exc:  # exporting or recording the end failed
        seen = run.observed(error=exc)
        return finish(run, decide_end(seen), seen, None)


def train(run: Attempt, config: JobConfig) -> Trained:
    """fetch -> prepare -> fit."""
    run.reporter.on_phase("preparing")
    c = run.claim
    archive, index = fetch_dataset(
        run.settings, run.store, c.dataset_id, c.archive_key, c.index_key
    )
    s = run.settings
    weights = WeightsSource(
        s.weights_dir, s.allow_weight_downloads, s.resolved_torch_hub_dir, s.resolved_hf_cache
    )
    if config.recipe == "auto" and config.plan is None:
        config = choose_recipe(run, config, archive, index, weights)
    if config.search is not None:  # trials share the image caches; the best one is the job's
        result = run_search(
            config,
            lambda spec: prepare(archive, index, spec, archive.parent),
            run.reporter,
            started=run.started,  # budget_seconds counts from this attempt's start
            weights=weights,
            num_workers=s.dataloader_workers,
        )
        config = searched_config(config, result)
        if config.plan is not None:
            result.extra["recipe"] = config.plan
        return Trained(config, prepare(archive, index, config, archive.parent), result)
    data = prepare(archive, index, config, archive.parent)
    try:  # room for what this job just cached; never a reason to fail it
        cache.trim(run.settings)
    except Exception:  # noqa: BLE001
        log.warning("job %s: could not trim the dataset cache", run.job_id, exc_info=True)
    resume = fetch_checkpoint(run)
    # `gpus` > 1: one process per GPU (worker/training/distributed.py), the same result.
    train_fit = (
        partial(fit_distributed, allow_cpu=s.allow_cpu_distributed) if config.gpus > 1 else fit
    )
    result = train_fit(
        config,
        data,
        run.reporter,
        weights=weights,
        num_workers=s.dataloader_workers,
        resume=resume,
        deadline=budget_deadline(run, config),
    )
    if config.plan is not None:
        result.extra["recipe"] = config.plan
    return Trained(config, data, result)


def fetch_checkpoint(run: Attempt) -> dict[str, Any] | None:
    """The last checkpoint of an earlier attempt, if there is one this code accepts."""
    key = run.claim.checkpoint_key
    if not key or not run.store.exists(key):
        return None
    local = run.workdir / "resume.pt"
    run.store.get_file(key, local)
    try:
        resume = load_checkpoint(local)
    except CheckpointRefused as exc:  # data only: never executed, never retried
        log.warning(
            "job %s checkpoint %s refused: %s; training from the start", run.job_id, key, exc
        )
        return None
    log.info("job %s resumes from %s epoch %s", run.job_id, resume["phase"], resume["epoch"])
    return resume


def observe(run: Attempt, trained: Trained) -> Observed:
    """The flags raised while training, read once, after `fit` returned."""
    reporter, result = run.reporter, trained.result
    canceled = reporter.cancel.is_set()
    keep_requested = False
    if canceled:
        with session_scope(run.settings) as s:
            mode = s.scalar(select(Job.cancel_mode).where(Job.id == run.job_id))
        keep_requested = mode == "stop-and-keep"
    return run.observed(
        lost=reporter.lost.is_set(),
        shutting_down=SHUTTING_DOWN.is_set(),
        canceled=canceled,
        keep_requested=keep_requested,
        time_limited=reporter.time_limited.is_set(),
        stopped_early=result.stopped,
        has_model=bool(result.best),
    )


def finish(run: Attempt, reason: EndReason, seen: Observed, trained: Trained | None) -> str:
    """Record `reason` on the job row (and the object store); return the job's status."""
    if reason is EndReason.LOST:
        log.warning("job %s: lost ownership, stopping without recording", run.job_id)
        drop_checkpoints_if_ended(run)
    elif reason is EndReason.HANDED_BACK:
        hand_back(run)
    elif reason is EndReason.TRANSIENT_RETRY:
        assert seen.error is not None
        if not retry_later(run, seen.error):
            return record_failure(run, seen.error)
    elif reason is EndReason.FAILED:
        assert seen.error is not None
        return record_failure(run, seen.error)
    elif reason in (EndReason.CANCELED_DISCARD, EndReason.TIME_LIMITED_EMPTY):
        discard(run, reason)
    else:
        assert trained is not None and reason.keeps_model
        # The model files, their checks and what else a finished job delivers:
        # worker/delivery.py.
        files, warned = export(run, trained)
        trained.result.extra["label_issues"] = label_issues(run, trained, reason)
        outcome = publish(run, trained, files, warned)
        record_model(run, reason, trained, outcome)
    return reason.status


def hand_back(run: Attempt) -> None:
    """Shutting down: requeue the job; it resumes from its last checkpoint elsewhere."""
    with session_scope(run.settings) as s:
        released = transitions.release(s, run.job_id, run.worker_id, "worker shut down", run.ran())
    if released:
        send_train(run.job_id, run.settings)
        log.warning("job %s handed back on shutdown; resumes from its checkpoint", run.job_id)


def retry_later(run: Attempt, exc: BaseException) -> bool:
    """Hand the job back and send it again after a delay. False if it is no longer ours."""
    reason = f"transient failure: {type(exc).__name__}: {exc}"
    with session_scope(run.settings) as s:
        if not transitions.release(s, run.job_id, run.worker_id, reason, run.ran()):
            return False
    delay = min(60.0, 5.0 * run.claim.attempt)
    send_train(run.job_id, run.settings, countdown=delay)
    log.warning("job %s: transient failure (%s); retrying in %.0fs", run.job_id, exc, delay)
    return True


def record_failure(run: Attempt, exc: BaseException) -> str:
    """Recorded at once with its code, message and traceback."""
    log.error("job %s failed", run.job_id, exc_info=exc)
    message = f"{type(exc).__name__}: {exc}"
    if is_transient(exc):  # out of attempts
        message += f" (after {run.claim.attempt} attempts)"
    with session_scope(run.settings) as s:
        failed = transitions.fail(
            s,
            run.job_id,
            code=error_code(exc),
            message=message,
            traceback="".join(traceback.format_exception(exc)),
            worker_id=run.worker_id,
        )
    if failed:
        drop_checkpoints(run)
    return "failed"


def drop_checkpoints(run: Attempt) -> None:
    """The job has ended: nothing resumes it, so its checkpoints go. When the store (or the
    database) is down, perhaps the very failure being recorded, the row still points at
    them and the reaper deletes them later (`core.reaper.sweep_checkpoints`)."""
    try:
        run.store.delete_prefix(checkpoint_prefix(run.job_id))
        with session_scope(run.settings) as s:
            transitions.forget_checkpoints(s, run.job_id)
    except Exception:  # noqa: BLE001
        log.warning("job %s: checkpoints left to the reaper", run.job_id, exc_info=True)


def drop_checkpoints_if_ended(run: Attempt) -> None:
    """A checkpoint this attempt wrote after the job ended elsewhere (failed by the reaper,
    say) would outlive the job: the row never pointed at it, so no sweep would find it."""
    try:
        with session_scope(run.settings) as s:
            status = s.scalar(select(Job.status).where(Job.id == run.job_id))
    except Exception:  # noqa: BLE001
        log.warning("job %s: could not read its status", run.job_id, exc_info=True)
        return
    if status in transitions.ENDED:
        drop_checkpoints(run)


def time_limit_message(run: Attempt, has_model: bool) -> str:
    return (
        f"the job reached its time limit of {run.claim.max_duration:g}s (max_duration_seconds) "
        f"in epoch {run.reporter.epoch}; "
        + ("the best model so far is kept" if has_model else "no epoch had finished")
    )


def discard(run: Attempt, reason: EndReason) -> None:
    """Canceled or out of time with nothing to download: no files remain."""
    run.store.delete_prefix(f"jobs/{run.job_id}")
    with session_scope(run.settings) as s:
        if reason is EndReason.CANCELED_DISCARD:
            transitions.finish_canceled(s, run.job_id, run.worker_id, None)
        else:
            message = time_limit_message(run, has_model=False)
            transitions.finish_time_limited(s, run.job_id, run.worker_id, None, message)
    drop_checkpoints(run)
    log.info("job %s %s; nothing kept", run.job_id, reason.value)


def record_model(
    run: Attempt, reason: EndReason, trained: Trained, outcome: dict[str, Any]
) -> None:
    """The end that keeps a model: succeeded, canceled with stop-and-keep, or time-limited."""
    job_id, worker_id = run.job_id, run.worker_id
    message = time_limit_message(run, has_model=True)
    with session_scope(run.settings) as s:
        if reason is EndReason.CANCELED_KEEP:
            done = transitions.finish_canceled(s, job_id, worker_id, outcome)
        elif reason is EndReason.TIME_LIMITED_KEPT:
            done = transitions.finish_time_limited(s, job_id, worker_id, outcome, message)
        else:
            done = transitions.succeed(s, job_id, worker_id, outcome)
        if not done:
            raise JobLost(f"job {job_id} could not be recorded by {worker_id}")
    drop_checkpoints(run)  # one final model, not two
    said = message if reason is EndReason.TIME_LIMITED_KEPT else reason.status
    log.info("job %s: %s: %s", job_id, said, trained.result.best)

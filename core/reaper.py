"""Finds jobs whose worker is gone and requeues or fails them, so that a job never stays
`running` after its worker died; and deletes the checkpoints of jobs that ended away from
their worker (failed by the reaper or the hard limit, canceled while interrupted). Runs in
the API process and in every worker; the guarded transitions make concurrent reapers
harmless."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from core import queue, transitions, webhook_store
from core.db import session_scope
from core.settings import Settings
from core.storage import get_store

log = logging.getLogger(__name__)


def reap_once(settings: Settings) -> tuple[list[str], list[str]]:
    with session_scope(settings) as session:
        requeue, failed = transitions.reap_stale(
            session, settings.stale_after_seconds, settings.max_attempts
        )
    for job_id in requeue:
        log.warning("job %s lost its worker: requeued", job_id)
        queue.send_train(job_id, settings)
    for job_id in failed:
        log.error("job %s lost its worker on its last attempt: failed", job_id)
        webhook_store.announce(settings, job_id)
    with session_scope(settings) as session:
        resend = transitions.resend_long_queued(session, settings.queued_resend_seconds)
    for job_id in resend:
        log.warning(
            "job %s still queued after %.0fs: task sent again",
            job_id,
            settings.queued_resend_seconds,
        )
        queue.send_train(job_id, settings)
    sweep_checkpoints(settings)
    webhook_store.resend_overdue(settings)
    return requeue, failed


def sweep_checkpoints(settings: Settings) -> list[str]:
    """Delete the checkpoints of ended jobs whose row still points at them. A checkpoint is
    only for resuming: an ended job never resumes, and a failed job's can be large."""
    with session_scope(settings) as session:
        ended = transitions.ended_with_checkpoints(session)
    if not ended:
        return []
    store = get_store(settings)
    swept = []
    for job_id in ended:
        store.delete_prefix(transitions.checkpoint_prefix(job_id))
        with session_scope(settings) as session:
            if transitions.forget_checkpoints(session, job_id):
                swept.append(job_id)
    if swept:
        log.info("deleted the checkpoints of %d ended job(s)", len(swept))
    return swept


class Reaper(threading.Thread):
    """`also`: more housekeeping for each round, run whatever the others do (a worker
    drops its cached copies of deleted datasets)."""

    def __init__(self, settings: Settings, also: Sequence[Callable[[Settings], object]] = ()):
        super().__init__(name="reaper", daemon=True)
        self.settings = settings
        self.rounds: list[Callable[[Settings], object]] = [reap_once, *also]
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reaper_interval_seconds):
            for step in self.rounds:
                try:
                    step(self.settings)
                except Exception:  # noqa: BLE001 - the next round tries again
                    name = getattr(step, "__name__", step)
                    log.warning("reaper round (%s) failed", name, exc_info=True)

    def stop(self) -> None:
        self.stopped.set()

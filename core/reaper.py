"""Finds jobs whose worker is gone and requeues or fails them, so that a job never stays
`running` after its worker died. Runs in the API process and in every worker; the guarded
transitions make concurrent reapers harmless."""

from __future__ import annotations

import logging
import threading

from core import queue, transitions
from core.db import session_scope
from core.settings import Settings

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
    with session_scope(settings) as session:
        resend = transitions.resend_long_queued(session, settings.queued_resend_seconds)
    for job_id in resend:
        log.warning(
            "job %s still queued after %.0fs: task sent again",
            job_id,
            settings.queued_resend_seconds,
        )
        queue.send_train(job_id, settings)
    return requeue, failed


class Reaper(threading.Thread):
    def __init__(self, settings: Settings):
        super().__init__(name="reaper", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reaper_interval_seconds):
            try:
                reap_once(self.settings)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.warning("reaper round failed", exc_info=True)

    def stop(self) -> None:
        self.stopped.set()

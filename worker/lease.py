"""The job's lease while it runs: a heartbeat thread that keeps it fresh (and notices a
cancel or a lost job between training steps), and the hard time limit behind the soft one."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from core import transitions
from core.db import session_scope
from core.errors import ErrorCode
from core.settings import Settings
from worker.reporting import DbReporter

log = logging.getLogger(__name__)


def _kill_this_process() -> None:
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


class Heartbeat(threading.Thread):
    """Keeps the lease fresh while a long step or the data preparation runs, and enforces
    the hard time limit: a job still running past it is hung (it ignored the soft limit), so
    it is failed and this worker process killed; its supervisor starts a fresh one."""

    def __init__(
        self,
        job_id: str,
        worker_id: str,
        settings: Settings,
        reporter: DbReporter,
        hard_deadline: float | None = None,
        on_hard_limit: Callable[[], None] = _kill_this_process,
    ):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.worker_id, self.settings = job_id, worker_id, settings
        self.reporter = reporter
        self.hard_deadline = hard_deadline
        self.on_hard_limit = on_hard_limit
        self.stopped = threading.Event()

    def _hard_limit(self) -> None:
        message = (
            "the job did not stop within JOB_STOP_GRACE_SECONDS "
            f"({self.settings.job_stop_grace_seconds:g}s) of its time limit (stuck in phase "
            f"{self.reporter.phase!r}); its worker process was killed"
        )
        log.critical("job %s: %s", self.job_id, message)
        try:
            with session_scope(self.settings) as s:
                transitions.fail(
                    s,
                    self.job_id,
                    code=ErrorCode.TIME_LIMIT_EXCEEDED.value,
                    message=message,
                    traceback="".join(traceback.format_stack(_main_thread_frame())),
                    worker_id=self.worker_id,
                )
        finally:
            self.on_hard_limit()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat_seconds):
            if self.hard_deadline is not None and time.monotonic() > self.hard_deadline:
                self._hard_limit()
                return
            try:
                with session_scope(self.settings) as s:
                    if not transitions.heartbeat(s, self.job_id, self.worker_id):
                        self.reporter.lost.set()
                        return
                    if transitions.cancel_requested(s, self.job_id):
                        self.reporter.cancel.set()
            except Exception:  # noqa: BLE001 - a missed beat is retried next period
                log.warning("heartbeat for %s failed", self.job_id, exc_info=True)


def _main_thread_frame() -> Any:
    """Where the main thread is stuck, for the failed job's traceback."""
    return sys._current_frames().get(threading.main_thread().ident or 0)

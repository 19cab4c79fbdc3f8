"""Child processes the CLI owns, and how they are stopped with everything they started.

Each embedded worker child runs in a process group of its own, so that stopping it also
stops what it started (DataLoader workers, a Celery pool's children) even when it dies
first and leaves them behind. It also keeps a terminal's Ctrl-C away from the children:
only `serve` decides how they stop (SIGTERM to the worker, which hands its job back, and
SIGKILL to the whole group when it has not finished within STOP_GRACE_SECONDS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("finetune")


def exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    """A handler that turns SIGTERM (or SIGINT) into SystemExit, so that `finally` blocks
    stop the children; the default action would end the process at once and orphan them."""
    raise SystemExit(128 + signum)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing is left in it
        os.killpg(pgid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`: for a child that stops its own children."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class WorkerSupervisor(threading.Thread):
    """Keeps an embedded worker child alive: restarts it when it dies, after a backoff (1 s,
    doubling, at most `max_backoff_seconds`). More than `max_restarts` deaths within
    `window_seconds` is a crash loop: it gives up, saying so. A worker that has run longer
    than the window starts with a clean slate, so occasional deaths (a job killed at its
    hard time limit, an out-of-memory kill) never add up to giving up."""

    def __init__(
        self,
        command: list[str],
        name: str = "worker-supervisor",
        max_restarts: int = 5,
        window_seconds: float = 600.0,
        stop_grace_seconds: float = 30.0,
        max_backoff_seconds: float = 30.0,
        env: dict[str, str] | None = None,
    ):
        super().__init__(name=name, daemon=True)
        self.command = command
        self.env = env  # None: this process's environment
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.gave_up = threading.Event()
        self.deaths: deque[float] = deque()
        # Held while starting, signalling or reaping the child: a pid is signalled only
        # while it is known not to have been reaped, so it can never name another process.
        self._lock = threading.Lock()

    def run(self) -> None:
        while True:
            with self._lock:
                if self.stopping.is_set():
                    return
                self.proc = subprocess.Popen(self.command, start_new_session=True, env=self.env)
            log.info("%s: worker child process started (pid %d)", self.name, self.proc.pid)
            code = self._wait(self.proc)
            if self.stopping.is_set():
                return
            delay = self._record_death()
            if delay is None:
                log.critical(
                    "%s: the worker died %d times within %gs (last exit code %d): a crash "
                    "loop, so it is not restarted again; this queue has no embedded worker "
                    "until `finetune serve` is restarted (see the log above for why it died; "
                    "WORKER_MAX_RESTARTS, WORKER_RESTART_WINDOW_SECONDS)",
                    self.name,
                    len(self.deaths),
                    self.window_seconds,
                    code,
                )
                self.gave_up.set()
                return
            log.error(
                "%s: worker exited with code %d; restarting in %.0fs (restart %d of %d "
                "allowed within %gs)",
                self.name,
                code,
                delay,
                len(self.deaths),
                self.max_restarts,
                self.window_seconds,
            )
            self.stopping.wait(delay)

    def _record_death(self) -> float | None:
        """The backoff before the next start, or None when that would be one too many."""
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.window_seconds:
            self.deaths.popleft()
        if len(self.deaths) > self.max_restarts:
            return None
        return float(min(self.max_backoff_seconds, 2.0 ** (len(self.deaths) - 1)))

    def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        # Wait without reaping: while the exited worker is a zombie its group id cannot be
        # reused, so killing the group reaches only what it left behind.
        if hasattr(os, "waitid"):
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        else:  # macOS: a group id reused in this instant is the (tiny) price
            while True:
                with self._lock:
                    if proc.poll() is not None:
                        break
                time.sleep(0.2)
        with self._lock:
            kill_group(proc.pid)
            return proc.wait()

    def stop(self) -> None:
        """SIGTERM to the worker (it hands its job back); SIGKILL to its whole group if it
        has not exited within the grace period. Returns when the group is gone."""
        with self._lock:
            self.stopping.set()
            proc = self.proc
            if proc is not None and proc.returncode is None:
                # Only the worker: its DataLoader workers must not die under a job that is
                # being handed back. Whatever it leaves is killed once it has exited.
                os.kill(proc.pid, signal.SIGTERM)
        if self.ident is None:
            return  # never started
        self.join(self.stop_grace_seconds)
        if self.is_alive():
            log.warning(
                "%s: the worker did not stop within %gs (STOP_GRACE_SECONDS); killing it",
                self.name,
                self.stop_grace_seconds,
            )
            self.kill()
            self.join()

    def kill(self) -> None:
        """SIGKILL the worker's whole group now."""
        with self._lock:
            self.stopping.set()
            if self.proc is not None and self.proc.returncode is None:
                kill_group(self.proc.pid)


def stop_all(supervisors: Sequence[WorkerSupervisor]) -> None:
    """Stop the children at the same time, so that stopping takes one child's grace period,
    not the sum of them. A second SIGINT or SIGTERM meanwhile kills them at once."""

    def kill_now(_signum: int, _frame: FrameType | None) -> None:
        for supervisor in supervisors:
            supervisor.kill()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, kill_now)
        signal.signal(signal.SIGINT, kill_now)
    threads = [threading.Thread(target=s.stop, name=f"stop-{s.name}") for s in supervisors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

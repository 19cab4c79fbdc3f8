"""`finetune serve`, `worker` and `migrate`: the processes, and the embedded worker children
that `serve` supervises."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from cli.admin import announce_auth
from core.settings import Settings, get_settings

log = logging.getLogger("finetune")

# `finetune worker --queues ROLE`: which of the two queues a worker consumes. Training jobs
# hold a worker for minutes to hours; light tasks (previews) must not wait behind them, so a
# deployment can give each queue its own workers.
QUEUE_ROLES = ("all", "training", "light")


def queues_for(settings: Settings, role: str = "all") -> list[str]:
    if role not in QUEUE_ROLES:
        raise ValueError(f"unknown queue role {role!r}; valid: {', '.join(QUEUE_ROLES)}")
    return {
        "all": [settings.task_queue, settings.light_queue],
        "training": [settings.task_queue],
        "light": [settings.light_queue],
    }[role]


def worker_command(
    settings: Settings,
    pool: str = "solo",
    queues: Sequence[str] | None = None,
    name: str = "finetune",
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        f"--pool={pool}",
        "--concurrency=1",
        "-Q",
        ",".join(queues or queues_for(settings)),
        "--loglevel",
        settings.log_level,
        "--hostname",
        f"{name}-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class WorkerSupervisor(threading.Thread):
    """Keeps an embedded worker child alive: restarts it if it dies, with backoff."""

    def __init__(self, command: list[str], max_restarts: int = 20, name: str = "worker-supervisor"):
        super().__init__(name=name, daemon=True)
        self.command = command
        self.max_restarts = max_restarts
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        restarts = 0
        while not self.stopping.is_set():
            self.proc = subprocess.Popen(self.command)
            log.info("%s: worker child process started (pid %d)", self.name, self.proc.pid)
            code = self.proc.wait()
            if self.stopping.is_set():
                return
            restarts += 1
            if restarts > self.max_restarts:
                log.error(
                    "%s: worker exited %d times; giving up (last code %d)",
                    self.name,
                    restarts,
                    code,
                )
                return
            delay = min(30.0, 2.0**restarts)
            log.error("%s: worker exited with code %d; restarting in %.0fs", self.name, code, delay)
            self.stopping.wait(delay)

    def stop(self) -> None:
        self.stopping.set()
        if self.proc is not None:
            stop_process(self.proc)


def embedded_workers(settings: Settings) -> list[WorkerSupervisor]:
    """Two children, so that a preview never waits behind a long training job: one on the
    training queue, one on the light queue."""
    return [
        WorkerSupervisor(
            worker_command(settings, queues=queues_for(settings, "training")),
            name="worker-supervisor",
        ),
        WorkerSupervisor(
            worker_command(settings, queues=queues_for(settings, "light"), name="finetune-light"),
            name="light-worker-supervisor",
        ),
    ]


def cmd_migrate(_: argparse.Namespace) -> int:
    from core.db import migrate

    migrate()
    print("database schema is up to date")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    os.execv(sys.executable, worker_command(settings, args.pool, queues_for(settings, args.queues)))
    return 0  # not reached


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from core.db import migrate

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings)
    announce_auth(settings)
    supervisors = [] if args.no_worker else embedded_workers(settings)
    try:
        if supervisors:
            # uvicorn re-raises the SIGTERM it handled once it has shut down; with the default
            # action that kills this process before `finally`, orphaning the worker children.
            signal.signal(signal.SIGTERM, _exit_on_signal)
        for supervisor in supervisors:
            supervisor.start()
        uvicorn.run("service.main:app", host=args.host, port=args.port, log_level="info")
    finally:
        stop_all(supervisors)
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_all(supervisors: Sequence[WorkerSupervisor]) -> None:
    """Stop the children at the same time, so that stopping takes one child's grace period,
    not the sum of them."""
    threads = [threading.Thread(target=s.stop, name=f"stop-{s.name}") for s in supervisors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

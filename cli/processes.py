"""`finetune serve`, `worker` and `migrate`: the processes, and the embedded worker children
that `serve` supervises."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from typing import Any

from cli.admin import announce_auth
from cli.supervisor import WorkerSupervisor, exit_on_signal, stop_all
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


# OpenMP threads that sleep instead of spinning while they wait. On a host where other
# work shares the cores, spinning threads collapse torch's CPU throughput (measured here
# with one other busy process: 23 img/s spinning, 89 img/s passive, for lite0 at 96 px).
# Set before the worker imports torch; an operator's own value wins.
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker_command(
    settings: Settings,
    pool: str = "solo",
    queues: Sequence[str] | None = None,
    name: str = "finetune",
) -> list[str]:
    """The Celery worker's command line (its environment gets `OMP_DEFAULTS`)."""
    for key, value in OMP_DEFAULTS.items():
        os.environ.setdefault(key, value)
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


def embedded_workers(settings: Settings) -> list[WorkerSupervisor]:
    """Two children, so that a preview never waits behind a long training job: one on the
    training queue, one on the light queue."""

    def supervisor(command: list[str], name: str) -> WorkerSupervisor:
        return WorkerSupervisor(
            command,
            name=name,
            max_restarts=settings.worker_max_restarts,
            window_seconds=settings.worker_restart_window_seconds,
            stop_grace_seconds=settings.stop_grace_seconds,
        )

    return [
        supervisor(
            worker_command(settings, queues=queues_for(settings, "training")),
            "worker-supervisor",
        ),
        supervisor(
            worker_command(settings, queues=queues_for(settings, "light"), name="finetune-light"),
            "light-worker-supervisor",
        ),
    ]


def proxy_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's forwarded-header options. Its defaults believe X-Forwarded-For from any
    peer on loopback, so a local client (or anything relaying through one) could write any
    address into the audit log; here they are believed only from FORWARDED_ALLOW_IPS."""
    if not settings.forwarded_allow_ips:
        return {"proxy_headers": False, "forwarded_allow_ips": ""}
    return {"proxy_headers": True, "forwarded_allow_ips": settings.forwarded_allow_ips}


def cmd_migrate(_: argparse.Namespace) -> int:
    from core.db import migrate

    migrate()
    print("database schema is up to date")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    if getattr(args, "gpus", None):
        from cli.gpus import GpuSpecError, cuda_device_count, parse_gpus, run_gpu_workers

        try:
            gpus = parse_gpus(args.gpus, cuda_device_count())
            per_job = bool(getattr(args, "per_job", False))
            if per_job and len(gpus) < 2:
                raise GpuSpecError(f"--gpus {args.gpus} --per-job: name two GPUs or more")
        except GpuSpecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return run_gpu_workers(settings, gpus, args.pool, per_job)
    os.execv(sys.executable, worker_command(settings, args.pool, queues_for(settings, args.queues)))
    return 0  # not reached


def share_metrics(settings: Settings) -> None:
    """Several API processes: each writes its metrics to files in one fresh folder, which
    any of them adds up on /metrics (prometheus-client's multiprocess mode; it reads the
    variable at import, so it is set before uvicorn starts them). The embedded workers,
    started after, write there too: one scrape of the API then has theirs as well."""
    folder = settings.prometheus_multiproc_dir or settings.data_dir / "prometheus-multiproc"
    shutil.rmtree(folder, ignore_errors=True)  # a previous run's counters are not ours
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def run_api(app: str, **options: Any) -> None:
    """uvicorn.run, but with several workers the shared listening socket gets TCP_NODELAY
    (inherited by every connection it accepts on Linux): uvicorn's worker processes serve
    sockets without it, and Nagle's algorithm then holds each response's body behind its
    headers until the client's delayed ACK, 40 ms a request (measured: 178 req/s on
    /healthz with --workers 2, 3,800 with this)."""
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if options.get("workers", 1) <= 1:
        uvicorn.run(app, **options)
        return
    config = uvicorn.Config(app, **options)
    sock = config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Multiprocess(config, sockets=[sock]).run()


def cmd_serve(args: argparse.Namespace) -> int:

    from core.db import migrate

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings)
    announce_auth(settings)
    if getattr(args, "workers", 1) > 1:
        share_metrics(settings)
    supervisors = [] if args.no_worker else embedded_workers(settings)
    # uvicorn re-raises the signal it handled once it has shut down; with the default
    # actions that ends this process before `finally` (SIGTERM), orphaning the worker
    # children, or with a traceback (SIGINT).
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, exit_on_signal)
    try:
        for supervisor in supervisors:
            supervisor.start()
        run_api(
            "service.main:app",
            host=args.host,
            port=args.port,
            # LOG_LEVEL holds for uvicorn too: WARNING drops the access log's line a request
            log_level=settings.log_level.lower(),
            # `--workers N`: uvicorn's supervisor forks N API processes; each has its own
            # key cache and (on the embedded default) its own rate-limit counters.
            workers=max(1, int(getattr(args, "workers", 1))),
            # A long download must not hold a stopping service (and its workers) forever.
            timeout_graceful_shutdown=max(1, round(settings.stop_grace_seconds)),
            # LOG_FORMAT=json: uvicorn's own lines (access log included) go through the
            # app's JSON handler (core/logs.py) instead of uvicorn's text formatters.
            **({"log_config": None} if settings.log_format == "json" else {}),
            **proxy_options(settings),
        )
    finally:
        stop_all(supervisors)
    return 0

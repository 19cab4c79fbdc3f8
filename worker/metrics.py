"""A worker's Prometheus metrics and the ids on its log lines.

Each worker process serves its own numbers on WORKER_METRICS_PORT (0: none). Workers that
share a host (`finetune serve`'s two children, one worker per GPU) take the next free port
of the 8 from there, and log the one they took. The solo pool runs tasks in the process
that serves, so no multiprocess collection is needed. The global numbers (jobs by status,
queue depth) are the API's (core/metrics.py), not repeated by every worker.

Around each task the job id (the task's first argument, for training and explanations) and
the request id that the API sent with the task (core/queue.py) are set in context, so every
log line of that task carries them (core/logs.py).
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from celery import signals
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from core import logs
from core.queue import EXPLAIN_TASK, REQUEST_ID_HEADER, TRAIN_TASK
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

PORTS_TRIED = 8

JOBS_STARTED = Counter("finetune_worker_jobs_started", "Training attempts this worker claimed")
JOBS_FINISHED = Counter(
    "finetune_worker_jobs_finished",
    "Training attempts this worker ended, by how the job was left (succeeded, failed, "
    "canceled, interrupted, retrying, lost, ...)",
    ["status"],
)
JOB_SECONDS = Histogram(
    "finetune_worker_job_duration_seconds",
    "One training attempt, claim to end, by how the job was left",
    ["status"],
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200),
)
EPOCH_SECONDS = Histogram(
    "finetune_worker_epoch_duration_seconds",
    "One training epoch (validation excluded)",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
)
IMAGES_PER_SECOND = Gauge(
    "finetune_worker_images_per_second", "Training throughput of the last epoch"
)
# Registered at the first CUDA epoch: a CPU worker exports no GPU series at all (a
# gauge at 0 would read as "uses no memory").
_gpu_max_memory: Gauge | None = None
TASKS = Counter(
    "finetune_worker_tasks", "Celery tasks run, by task name and outcome", ["task", "outcome"]
)

_task_tokens: contextvars.ContextVar[tuple[Any, Any] | None] = contextvars.ContextVar(
    "_task_tokens", default=None
)


def serve(settings: Settings) -> int | None:
    """Start this process's /metrics; the port it took, or None (off, or none free)."""
    first = settings.worker_metrics_port
    if not first:
        return None
    for port in range(first, min(first + PORTS_TRIED, 65536)):
        try:
            start_http_server(port)
        except OSError:
            continue
        log.info("worker metrics on :%d/metrics", port)
        return port
    log.warning(
        "worker metrics are off: ports %d-%d are all in use (WORKER_METRICS_PORT)",
        first,
        first + PORTS_TRIED - 1,
    )
    return None


def job_started() -> None:
    JOBS_STARTED.inc()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()  # the gauge is this job's peak, not the process's


def job_finished(status: str, seconds: float) -> None:
    JOBS_FINISHED.labels(status).inc()
    JOB_SECONDS.labels(status).observe(seconds)


def epoch_ended(metrics: dict[str, Any]) -> None:
    """From the epoch's own metrics (worker/training/selection.py: epoch_metrics)."""
    if isinstance(metrics.get("epoch_seconds"), int | float):
        EPOCH_SECONDS.observe(metrics["epoch_seconds"])
    if isinstance(metrics.get("images_per_second"), int | float):
        IMAGES_PER_SECOND.set(metrics["images_per_second"])
    import torch  # already loaded: the epoch just trained with it

    global _gpu_max_memory
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if _gpu_max_memory is None:
            _gpu_max_memory = Gauge(
                "finetune_worker_gpu_max_memory_bytes",
                "Peak CUDA memory allocated by the job in hand (absent on a CPU worker)",
            )
        _gpu_max_memory.set(torch.cuda.max_memory_allocated())


@signals.worker_ready.connect
def _serve(**_: Any) -> None:
    serve(get_settings())


@signals.task_prerun.connect
def _task_ids(task: Any = None, args: Any = None, **_: Any) -> None:
    name = getattr(task, "name", "")
    jid = str(args[0]) if name in (TRAIN_TASK, EXPLAIN_TASK) and args else None
    rid = task.request.get(REQUEST_ID_HEADER) if task is not None else None
    _task_tokens.set((logs.job_id.set(jid), logs.request_id.set(rid)))


@signals.task_postrun.connect
def _task_done(task: Any = None, state: str | None = None, **_: Any) -> None:
    TASKS.labels(getattr(task, "name", "?"), (state or "unknown").lower()).inc()
    tokens = _task_tokens.get()
    if tokens is not None:
        logs.job_id.reset(tokens[0])
        logs.request_id.reset(tokens[1])
        _task_tokens.set(None)

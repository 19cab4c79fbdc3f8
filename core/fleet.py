"""The workers and what they can run: each worker writes its row (`workers`) when it starts
and with every beat of its housekeeping loop; the API asks the live rows, not its own host,
whether a job can run (its backbone's weights, a GPU) and which queue it goes to.

A row is live while its beat is under `STALE_AFTER_SECONDS` old (the same patience the
reaper gives a running job's heartbeat); after `FORGET_AFTER` times that, any beat deletes
it. With no live training worker on record (the embedded default before its worker says
so, tests without workers) the API falls back to its own host, as before workers
published anything.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.backbones import BACKBONES
from core.db import session_scope, utcnow
from core.errors import ErrorCode, ServiceError
from core.jobspec import MAX_GPUS
from core.models import Job, Worker
from core.settings import Settings
from core.weights import usable_backbones as host_backbones
from core.weights import weights_on_host

log = logging.getLogger(__name__)

FORGET_AFTER = 10  # stale periods after which a silent worker's row is deleted
DEVICES = ("auto", "cpu", "gpu")


@dataclass
class Capabilities:
    """What one worker can run, as it publishes it."""

    hostname: str
    queues: list[str]
    device_kind: str  # "cpu" or "cuda"
    device_name: str
    memory_bytes: int | None
    backbones: list[str] = field(default_factory=list)


def publish(settings: Settings, worker_id: str, caps: Capabilities) -> None:
    """Write (or refresh) this worker's row, and forget workers long silent. Called at start
    and on every beat: a row deleted meanwhile (a long pause) comes back whole."""
    now = utcnow()
    with session_scope(settings) as session:
        row = session.get(Worker, worker_id)
        if row is None:
            session.add(Worker(id=worker_id, started_at=now, heartbeat_at=now, **asdict(caps)))
        else:
            for key, value in asdict(caps).items():
                setattr(row, key, value)
            row.heartbeat_at = now
        forget = now - timedelta(seconds=settings.stale_after_seconds * FORGET_AFTER)
        session.execute(delete(Worker).where(Worker.heartbeat_at < forget))


def withdraw(settings: Settings, worker_id: str) -> None:
    """A worker that stops cleanly leaves at once (a killed one goes stale)."""
    with session_scope(settings) as session:
        session.execute(delete(Worker).where(Worker.id == worker_id))


def live_workers(session: Session, settings: Settings) -> list[Worker]:
    since = utcnow() - timedelta(seconds=settings.stale_after_seconds)
    return list(session.scalars(select(Worker).where(Worker.heartbeat_at >= since)))


def multi_gpu_queue(settings: Settings, gpus: int) -> str:
    """Where a job with `gpus` > 1 waits: consumed only by a worker that sees that many
    GPUs (`finetune worker --gpus 0,1 --per-job` consumes `-x2`; four GPUs, `-x2`..`-x4`)."""
    return f"{settings.gpu_queue}-x{gpus}"


def multi_gpu_queues(settings: Settings, count: int) -> list[str]:
    """The queues a worker that sees `count` GPUs consumes: jobs of 2 .. `count` GPUs."""
    return [multi_gpu_queue(settings, n) for n in range(2, min(count, MAX_GPUS) + 1)]


def _trains(settings: Settings, queues: list[str]) -> bool:
    multi = set(multi_gpu_queues(settings, MAX_GPUS))
    return bool({settings.task_queue, settings.gpu_queue, *multi} & set(queues))


def training_workers(
    session: Session, settings: Settings, device: str = "auto", gpus: int = 1
) -> list[Worker]:
    """Live workers that consume a training queue; `gpu`: only CUDA workers on GPU_QUEUE
    (`finetune worker --gpus`), where `device: gpu` jobs go; `cpu`: only those on
    TASK_QUEUE, where `device: cpu` jobs go (a plain worker on a GPU host trains them on its
    CPU, and `auto` ones on its GPU). `gpus` > 1 (not `cpu`): only the workers on that
    many GPUs' queue (`multi_gpu_queue`)."""
    found = [w for w in live_workers(session, settings) if _trains(settings, w.queues)]
    if gpus > 1 and device != "cpu":
        queue = multi_gpu_queue(settings, gpus)
        return [w for w in found if w.device_kind == "cuda" and queue in w.queues]
    if device == "gpu":
        found = [w for w in found if w.device_kind == "cuda" and settings.gpu_queue in w.queues]
    elif device == "cpu":
        found = [w for w in found if settings.task_queue in w.queues]
    return found


def usable_backbones(session: Session, settings: Settings) -> list[str] | None:
    """The backbones some live training worker can load; None with no worker on record
    (the API's host answers then). `GET /v1/backbones` and the submit check agree."""
    workers = training_workers(session, settings)
    return sorted({b for w in workers for b in w.backbones}) if workers else None


def check_submit(
    session: Session, settings: Settings, backbone: str, device: str, gpus: int = 1
) -> None:
    """Refuse (422) a job no live worker can run: no GPU for `device: gpu`, no worker that
    sees `gpus` GPUs, or no weights for its backbone. Without any live training worker on
    record, the API's host answers for the weights (the check from before workers
    published)."""
    everyone = training_workers(session, settings)
    fit = training_workers(session, settings, device, gpus)
    if gpus > 1:
        _check_gpus(settings, everyone, fit, device, gpus)
    if gpus > 1 and not fit:  # ALLOW_CPU_DISTRIBUTED: the CPU workers' gloo ranks
        fit = training_workers(session, settings, "cpu")
    if device == "gpu" and not fit:
        seen = ", ".join(sorted({f"{w.id} ({w.device_kind})" for w in everyone})) or "none"
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            f"device 'gpu': no live worker has a GPU on GPU_QUEUE (live training workers: "
            f"{seen}); start one with `finetune worker --gpus all`, or submit with device "
            "'auto' (a plain worker on a GPU host trains on its GPU) or 'cpu'",
        )
    if device == "cpu" and everyone and not fit:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            "device 'cpu': no live worker consumes TASK_QUEUE (the live training workers are "
            "all GPU workers); start one with `finetune worker --queues training`, or submit "
            "with device 'auto' or 'gpu'",
        )
    if fit:
        usable = sorted({b for w in fit for b in w.backbones})
        if backbone in usable:
            return
        where = {"gpu": "no live GPU worker", "cpu": "no live CPU worker"}.get(
            device, "no live worker"
        )
    elif settings.allow_weight_downloads or weights_on_host(BACKBONES[backbone], settings):
        return
    else:
        usable, where = host_backbones(settings), "no worker on record and not this host"
    raise ServiceError(
        ErrorCode.WEIGHTS_UNAVAILABLE,
        f"no ImageNet weights for {backbone!r}: {where} has them; usable now: "
        f"{', '.join(usable) or 'none'}. Run `finetune weights pull {backbone}` on a host "
        "with internet and put them in the workers' WEIGHTS_DIR, or set "
        "ALLOW_WEIGHT_DOWNLOADS=true",
    )


def _check_gpus(
    settings: Settings, everyone: list[Worker], fit: list[Worker], device: str, gpus: int
) -> None:
    """`gpus` > 1 needs a live worker that sees that many GPUs; on the CPU (device `cpu`,
    or no such worker) only where the operator allows gloo ranks (ALLOW_CPU_DISTRIBUTED)."""
    if settings.allow_cpu_distributed and device != "gpu":
        return
    if device == "cpu":
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            f"gpus {gpus} with device 'cpu': a job trains on several processes only on "
            "GPUs (this service does not allow it on the CPU: ALLOW_CPU_DISTRIBUTED); "
            "submit with gpus 1, or with device 'gpu' or 'auto'",
        )
    if fit:
        return
    seen = ", ".join(sorted(f"{w.id} ({w.device_kind})" for w in everyone)) or "none"
    raise ServiceError(
        ErrorCode.VALIDATION_ERROR,
        f"gpus {gpus}: no live worker sees {gpus} GPUs (it would consume "
        f"{multi_gpu_queue(settings, gpus)}; live training workers: {seen}); start one with "
        f"`finetune worker --gpus <{gpus} indices> --per-job`, or submit with gpus 1 "
        f"(accepted: 1 to {MAX_GPUS})",
    )


def train_queue(session: Session, settings: Settings, device: str, gpus: int = 1) -> str:
    """`cpu` -> TASK_QUEUE; `gpu` -> GPU_QUEUE (a requeued job waits there for a GPU worker);
    `auto` -> GPU_QUEUE when a live worker consumes it, else TASK_QUEUE (a service without
    GPU workers routes as it always did). `gpus` > 1: that many GPUs' queue, where only a
    worker that sees them takes it (with ALLOW_CPU_DISTRIBUTED and none live, or device
    `cpu`: TASK_QUEUE)."""
    if gpus > 1 and device != "cpu":
        queue = multi_gpu_queue(settings, gpus)
        live = any(queue in w.queues for w in live_workers(session, settings))
        if live or device == "gpu" or not settings.allow_cpu_distributed:
            return queue
        return settings.task_queue
    if device == "gpu":
        return settings.gpu_queue
    if device == "auto" and any(
        settings.gpu_queue in w.queues for w in live_workers(session, settings)
    ):
        return settings.gpu_queue
    return settings.task_queue


def queue_for_job(settings: Settings, job_id: str) -> str:
    """The training queue for a job's stored `device`, decided now (a job requeued after its
    GPU worker died goes where a worker can take it). TASK_QUEUE if the row cannot be read:
    sending must not fail for the routing's sake."""
    try:
        with session_scope(settings) as session:
            job = session.get(Job, job_id)
            config = (job.config or {}) if job else {}
            device = str(config.get("device", "auto"))
            return train_queue(session, settings, device, int(config.get("gpus", 1)))
    except Exception:  # noqa: BLE001 - the task queue is always consumed by CPU workers
        log.warning("job %s: could not choose its queue; sent to TASK_QUEUE", job_id, exc_info=True)
        return settings.task_queue

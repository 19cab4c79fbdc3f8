"""`finetune worker --gpus all|0,1`: one supervised worker child per GPU, each pinned to its
GPU with CUDA_VISIBLE_DEVICES (so it sees one device, `cuda:0`) and consuming GPU_QUEUE.

One process per GPU, not one process driving several: a job holds its worker for its whole
run, so N GPUs train N jobs at once, and a child that dies (out of memory) takes one GPU's
job with it, restarted by its supervisor like `serve`'s embedded workers.

`--per-job` instead: one worker that sees all the GPUs named and trains one job on them
at once (a job's `gpus` > 1: one process per GPU, worker/training/distributed.py); it
consumes the queues of jobs of 2 .. N GPUs (`core.fleet.multi_gpu_queues`), not GPU_QUEUE.
"""

from __future__ import annotations

import os
import signal
import time

from cli.processes import worker_command
from cli.supervisor import WorkerSupervisor, exit_on_signal, stop_all
from core import fleet
from core.settings import Settings


class GpuSpecError(ValueError):
    """`--gpus` names no usable GPU; the message says what this host has."""


def cuda_device_count() -> int:
    """GPUs this host's torch can use (0 without CUDA). Imported here only: the CLI's other
    commands never load torch."""
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def parse_gpus(spec: str, count: int) -> list[int]:
    """`all` or a comma-separated list of indices, checked against the `count` GPUs here."""
    if count == 0:
        raise GpuSpecError(
            f"--gpus {spec}: this host has no CUDA GPU (torch sees none); run `finetune worker` "
            "without --gpus for a CPU worker"
        )
    valid = f"valid: all, or indices 0..{count - 1} separated by commas"
    if spec.strip() == "all":
        return list(range(count))
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            raise GpuSpecError(f"--gpus {spec}: {part!r} is not a GPU index; {valid}")
        index = int(part)
        if index >= count:
            raise GpuSpecError(f"--gpus {spec}: this host has {count} GPU(s), no {index}; {valid}")
        if index in ids:
            raise GpuSpecError(f"--gpus {spec}: GPU {index} is named twice; {valid}")
        ids.append(index)
    return ids


def gpu_worker_env(base: dict[str, str], gpu: int) -> dict[str, str]:
    """The child's environment: this process's, with only its GPU visible."""
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def gpu_supervisors(
    settings: Settings, gpus: list[int], pool: str, per_job: bool = False
) -> list[WorkerSupervisor]:
    base = dict(os.environ)
    if per_job:  # one worker that sees them all, for jobs with `gpus` 2 .. len(gpus)
        if len(gpus) < 2:
            raise GpuSpecError(f"--per-job trains one job on several GPUs; --gpus names {gpus}")
        env = {**base, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
        queues = fleet.multi_gpu_queues(settings, len(gpus))
        name = "finetune-gpus" + "-".join(map(str, gpus))
        return [
            WorkerSupervisor(
                worker_command(settings, pool, queues, name=name),
                name=f"gpus{'-'.join(map(str, gpus))}-worker-supervisor",
                max_restarts=settings.worker_max_restarts,
                window_seconds=settings.worker_restart_window_seconds,
                stop_grace_seconds=settings.stop_grace_seconds,
                env=env,
            )
        ]
    return [
        WorkerSupervisor(
            worker_command(settings, pool, [settings.gpu_queue], name=f"finetune-gpu{gpu}"),
            name=f"gpu{gpu}-worker-supervisor",
            max_restarts=settings.worker_max_restarts,
            window_seconds=settings.worker_restart_window_seconds,
            stop_grace_seconds=settings.stop_grace_seconds,
            env=gpu_worker_env(base, gpu),
        )
        for gpu in gpus
    ]


def run_gpu_workers(settings: Settings, gpus: list[int], pool: str, per_job: bool = False) -> int:
    """Supervise the children until a signal, or until every one has given up (exit 1)."""
    supervisors = gpu_supervisors(settings, gpus, pool, per_job)
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, exit_on_signal)
    try:
        for supervisor in supervisors:
            supervisor.start()
        while not all(s.gave_up.is_set() for s in supervisors):
            time.sleep(1.0)
        return 1
    finally:
        stop_all(supervisors)

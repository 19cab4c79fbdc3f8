"""One job on several devices: `fit` in `gpus` processes, DistributedDataParallel.

torch's elastic launcher (`torch.distributed.launcher.api.elastic_launch`, what `torchrun`
runs) starts the ranks on this host (c10d rendezvous on a free localhost port, as
`torchrun --standalone`), NCCL on CUDA devices (rank r on `cuda:r`), gloo on the CPU
(tests; an operator's `ALLOW_CPU_DISTRIBUTED`). Each rank runs the ordinary `fit`:
`Runtime` sees the process group, so the training loader takes this rank's share of each
epoch (`EpochSampler`, DistributedSampler's split), the model trains wrapped in DDP, rank
0 validates and extracts the probe's features for all (`Runtime.from_rank0`), and the
stop flags and epoch plan are agreed with an all-reduce (`Control.agree`), so all ranks
take the same steps and stop at the same one. `batch_size` is per rank: N ranks take 1/N
of the optimizer steps of one process, on N times its batch.

The callbacks (the job row, the object store) cannot cross into the ranks, so rank 0
writes what it reports into a private folder: `events.jsonl` (phases, steps, epoch
metrics), checkpoint files, and at the end the model and its report; the parent polls it
and calls the real callbacks from its own thread. A stop the parent's callbacks ask for
is a `stop` file that every rank reads between steps. A resume checkpoint is read by
every rank. The parent gets a normal `FitResult` (a CPU model), so export and delivery do
not change.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from core.jobspec import JobSpec
from worker.training import scratch
from worker.training.backbones import create_model
from worker.training.callbacks import Callbacks
from worker.training.checkpoint import load_checkpoint
from worker.training.data import PreparedData
from worker.training.fit import FitResult, fit
from worker.training.weights import WeightsSource

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2  # how often the parent relays the ranks' events and its stop requests

# How long a rank waits in one collective for the others (see init_process_group below).
COLLECTIVE_TIMEOUT = timedelta(hours=6)


class DistributedRefused(RuntimeError):
    """This worker cannot run the job's `gpus` processes (too few devices, or a CPU)."""


def _shutdown_timeout(seconds: int) -> dict[str, Any]:
    """LaunchConfig's `shutdown_timeout`, where this torch has it (2.11's has not: there the
    launcher's own default applies)."""
    fields = getattr(LaunchConfig, "__dataclass_fields__", {})
    return {"shutdown_timeout": seconds} if "shutdown_timeout" in fields else {}


def backend_for(config: JobSpec, allow_cpu: bool) -> str:
    """'nccl' when this worker sees `config.gpus` CUDA devices, 'gloo' on the CPU when
    `allow_cpu`; otherwise refused, saying what this worker has."""
    n = config.gpus
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if config.device != "cpu" and cuda >= n:
        return "nccl"
    if config.device != "cpu" and (cuda > 0 or config.device == "gpu"):
        raise DistributedRefused(
            f"the job asked for gpus={n} and this worker sees {cuda} CUDA device(s) (its "
            f"CUDA_VISIBLE_DEVICES); it needs a worker that sees {n} "
            "(`finetune worker --gpus 0,1 --per-job`)"
        )
    if not allow_cpu:
        raise DistributedRefused(
            f"the job asked for gpus={n} and this worker trains on the CPU; several processes "
            "on one CPU are no faster than one: submit with gpus 1, or set "
            "ALLOW_CPU_DISTRIBUTED=true on the worker (tests)"
        )
    return "gloo"


@dataclass
class RankInputs:
    """What every rank needs, pickled to it by the launcher (spawn). The image cache goes
    as its file name (each rank maps it), not as its bytes."""

    config: JobSpec  # or the worker's JobConfig around it: pickled whole
    data: PreparedData
    cache_file: str | None
    backend: str
    weights: WeightsSource | None
    num_workers: int | None
    pretrained: bool
    resume_file: str | None
    deadline: float | None
    parent_pid: int
    processes: int


def fit_distributed(
    config: JobSpec,
    data: PreparedData,
    callbacks: Callbacks | None = None,
    *,
    allow_cpu: bool = False,
    weights: WeightsSource | None = None,
    num_workers: int | None = None,
    pretrained: bool = True,
    resume: dict[str, Any] | None = None,
    deadline: float | None = None,
) -> FitResult:
    """`fit` in `config.gpus` ranks (see the module's docstring); the same arguments, and
    the same result, as `fit`. `allow_cpu`: gloo ranks on the CPU when there is no CUDA
    device (or the job asks for `device: cpu`); otherwise such a job is refused."""
    callbacks = callbacks or Callbacks()
    backend = backend_for(config, allow_cpu)
    if deadline is None and config.time_budget_seconds:
        # time.monotonic is system-wide on Linux: the ranks read the same clock.
        deadline = time.monotonic() + config.time_budget_seconds  # starting the ranks counts
    work = scratch.make("ddp")  # the ranks' shared files; swept if this worker is killed
    try:
        resume_file = None
        if resume is not None:
            torch.save(resume, work / "resume.pt")
            resume_file = str(work / "resume.pt")
        cache_file = getattr(data.cache, "filename", None)
        inputs = RankInputs(
            config,
            replace(data, cache=np.empty(0, np.uint8)) if cache_file else data,
            str(cache_file) if cache_file else None,
            backend,
            weights,
            num_workers,
            pretrained,
            resume_file,
            deadline,
            os.getpid(),
            config.gpus,
        )
        launch = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=config.gpus,
            run_id=f"finetune-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a free port, as `torchrun --standalone`
            max_restarts=0,  # a failed rank fails the attempt; the job resumes elsewhere
            monitor_interval=0.5,
            start_method="spawn",  # CUDA in the ranks: never forked
            **_shutdown_timeout(10),  # seconds a rank gets after another failed (then SIGKILL)
        )
        outcome: dict[str, Any] = {}

        def run_ranks() -> None:
            try:
                elastic_launch(launch, _rank_main)(inputs, str(work))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = exc

        # The launcher in a thread (it installs no signal handlers there), the callbacks
        # in the caller's: a reporter's database session never crosses threads.
        launcher = threading.Thread(target=run_ranks, name="ddp-launcher", daemon=True)
        launcher.start()
        relay = Relay(work, callbacks)
        try:
            while launcher.is_alive():
                launcher.join(POLL_SECONDS)
                relay.forward()
                if callbacks.should_stop():
                    relay.ask_stop(callbacks.checkpoint_on_stop())
            relay.forward()
        finally:  # the caller fails or is interrupted: the ranks stop at their next step
            relay.ask_stop(False)
            launcher.join()
        if "error" in outcome:
            raise _failure(outcome["error"], config.gpus) from outcome["error"]
        return _result(work, config)
    finally:
        scratch.release(work)


class Relay:
    """The parent's side of the work folder: forwards rank 0's events to the callbacks,
    and writes the stop file."""

    def __init__(self, work: Path, callbacks: Callbacks):
        self.work, self.callbacks, self.offset, self.stopped = work, callbacks, 0, False

    def ask_stop(self, checkpoint: bool) -> None:
        if self.stopped:
            return
        self.stopped = True
        part = self.work / "stop.part"
        part.write_text(json.dumps({"checkpoint": checkpoint}))
        os.replace(part, self.work / "stop")  # whole, or not there

    def forward(self) -> None:
        events = self.work / "events.jsonl"
        if not events.exists():
            return
        with events.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
        self.offset += len(complete)
        for line in complete.splitlines():
            self._call(json.loads(line))

    def _call(self, event: dict[str, Any]) -> None:
        hook, cb = event["hook"], self.callbacks
        if hook == "phase":
            cb.on_phase(event["phase"])
        elif hook == "step":
            cb.on_step(event["epoch"], event["step"], event["steps"])
        elif hook == "epoch_end":
            cb.on_epoch_end(event["metrics"], event["best"])
        elif hook == "plan":
            cb.on_plan(event["epochs"])
        elif hook == "checkpoint":
            path = Path(event["file"])
            cb.on_checkpoint(load_checkpoint(path))  # weights-only, as any checkpoint
            path.unlink(missing_ok=True)


def _failure(exc: BaseException, n: int) -> BaseException:
    """A failed rank as one line naming it and its error (the launcher's ChildFailedError
    says "see the logs"; the traceback is in them and in the error file)."""
    if isinstance(exc, ChildFailedError):
        rank, failure = exc.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        return RuntimeError(f"distributed training (gpus={n}) failed on rank {rank}: {message}")
    return exc


def _result(work: Path, config: JobSpec) -> FitResult:
    """The model and report rank 0 left, as `fit` returns them."""
    meta = json.loads((work / "result.json").read_text())
    tensors = torch.load(work / "result.pt", map_location="cpu", weights_only=True)
    model = create_model(config.backbone, len(meta["classes"]), pretrained=False)
    model.load_state_dict(tensors["model"])
    probe = tensors.get("probe_cache")
    return FitResult(
        model=model.eval(),
        classes=meta["classes"],
        history=meta["history"],
        best=meta["best"],
        report=meta["report"],
        stopped_reason=meta["stopped_reason"],
        device=meta["device"],
        extra=meta["extra"],
        probe_cache=(*probe[:4], meta["probe_penalty"]) if probe else None,
        val_logits=tensors.get("val_logits"),
    )


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and arrays in metrics."""
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class RankCallbacks(Callbacks):
    """Inside a rank: stop when the parent's stop file appears (or the parent is gone).
    Rank 0 also writes its events and checkpoints for the parent (`Relay`); the others
    keep no checkpoints at all (`Control.keeps_checkpoints`)."""

    def __init__(self, work: Path, parent_pid: int):
        self.work, self.parent_pid = work, parent_pid

    def should_stop(self) -> bool:
        return (self.work / "stop").exists() or os.getppid() != self.parent_pid

    def checkpoint_on_stop(self) -> bool:
        try:
            return bool(json.loads((self.work / "stop").read_text())["checkpoint"])
        except (OSError, ValueError, KeyError):
            return False


class RankZeroCallbacks(RankCallbacks):
    def __init__(self, work: Path, parent_pid: int):
        super().__init__(work, parent_pid)
        self.events = (work / "events.jsonl").open("a", encoding="utf-8")
        self.saved = 0

    def _emit(self, **event: Any) -> None:
        self.events.write(json.dumps(event, default=_plain) + "\n")
        self.events.flush()

    def on_phase(self, phase: str) -> None:
        self._emit(hook="phase", phase=phase)

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self._emit(hook="step", epoch=epoch, step=step, steps=steps_per_epoch)

    def on_epoch_end(self, metrics: dict[str, Any], best: dict[str, Any]) -> None:
        self._emit(hook="epoch_end", metrics=metrics, best=best)

    def on_plan(self, epochs: float) -> None:
        self._emit(hook="plan", epochs=epochs)

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        self.saved += 1
        path = self.work / f"checkpoint-{self.saved}.pt"
        torch.save(state, path.with_suffix(".part"))
        os.replace(path.with_suffix(".part"), path)
        self._emit(hook="checkpoint", file=str(path))


def _rank_main(inputs: RankInputs, tmp: str) -> None:
    """One rank (in a process the launcher spawned; its environment names the rank)."""
    # Ctrl-C, or a SIGTERM sent to the whole group: the parent decides how the job stops
    # (hand it back with a checkpoint); a rank whose parent is gone stops by itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    local_rank = dist.get_node_local_rank()  # set by the launcher, as torchrun does
    if inputs.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:  # the host's cores shared among the ranks, not each rank taking them all
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // inputs.processes))
    # Rank 0 alone extracts the probe's features and validates while the others wait in a
    # collective: NCCL's 10-minute default watchdog would end a job on a large dataset.
    dist.init_process_group(inputs.backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        work, rank = Path(tmp), dist.get_rank()
        callbacks = (RankZeroCallbacks if rank == 0 else RankCallbacks)(work, inputs.parent_pid)
        data = inputs.data
        if inputs.cache_file:
            data = replace(data, cache=np.load(inputs.cache_file, mmap_mode="r"))
        resume = load_checkpoint(Path(inputs.resume_file)) if inputs.resume_file else None
        result = fit(
            inputs.config,
            data,
            callbacks,
            device=device,
            weights=inputs.weights,
            num_workers=inputs.num_workers,
            pretrained=inputs.pretrained,
            resume=resume,
            deadline=inputs.deadline,
        )
        if rank == 0:
            _save_result(work, result, dist.get_world_size(), inputs.backend)
    finally:
        dist.destroy_process_group()


def _save_result(work: Path, result: FitResult, world: int, backend: str) -> None:
    probe = result.probe_cache
    tensors: dict[str, Any] = {"model": result.model.state_dict()}
    if result.val_logits is not None:
        tensors["val_logits"] = result.val_logits
    if probe is not None:
        tensors["probe_cache"] = list(probe[:4])
    torch.save(tensors, work / "result.pt")
    extra = {**result.extra, "distributed": {"processes": world, "backend": backend}}
    meta = {
        "classes": result.classes,
        "history": result.history,
        "best": result.best,
        "report": result.report,
        "stopped_reason": result.stopped_reason,
        "device": result.device,
        "extra": extra,
        "probe_penalty": probe[4] if probe is not None else None,
    }
    (work / "result.json").write_text(json.dumps(meta, default=_plain))

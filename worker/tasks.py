"""The only glue between the queue, the database and the training library:
claim the job, build its inputs, call `fit`, record the outcome."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy.exc
import torch
from sqlalchemy import select

from core import transitions
from core.db import session_scope
from core.errors import ErrorCode
from core.jobspec import ConfigInvalid, parse_job_config
from core.models import Dataset, Job
from core.queue import TRAIN_TASK, send_train
from core.settings import Settings, get_settings
from core.storage import StorageError, StorageNotFound, get_store
from worker.celery_app import SHUTTING_DOWN, app
from worker.datasets import fetch_dataset
from worker.training.callbacks import Callbacks
from worker.training.checkpoint import CheckpointRefused, load_checkpoint
from worker.training.data import prepare
from worker.training.export import build_metadata, export_model
from worker.training.fit import fit
from worker.training.plots import confusion_matrix_png, curves_png
from worker.training.weights import WeightsSource, WeightsUnavailable

log = logging.getLogger(__name__)


TRANSIENT = (StorageError, sqlalchemy.exc.OperationalError)


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints/"


class JobLost(RuntimeError):
    """This worker no longer owns the job (reclaimed, canceled or finished elsewhere)."""


class DbReporter(Callbacks):
    """Writes progress and per-epoch metrics to the job row, throttled."""

    def __init__(
        self,
        job_id: str,
        worker_id: str,
        settings: Settings,
        total_epochs: int,
        deadline: float | None = None,
        attempt: int = 1,
    ):
        self.job_id = job_id
        # One key per attempt: a worker that lost the job (and has not noticed yet) can
        # never overwrite the checkpoint of the worker that took it over.
        self.checkpoint_key = f"{checkpoint_prefix(job_id)}attempt-{attempt}.pt"
        self.worker_id = worker_id
        self.settings = settings
        self.total_epochs = total_epochs
        self.phase = "starting"
        self.lost = threading.Event()  # another worker or the reaper took the job
        self.cancel = threading.Event()  # the user asked to cancel
        self.deadline = deadline  # soft time limit (time.monotonic())
        self.time_limited = threading.Event()
        self.started = time.monotonic()
        self.last_write = 0.0
        self.epoch = 0
        self.done_steps = 0
        self.total_steps = 0
        self.history: list[dict[str, Any]] = []
        self.checkpoint_seconds: list[float] = []
        self.store = get_store(settings)

    def _write(self, **values: Any) -> None:
        with session_scope(self.settings) as s:
            if not transitions.record_progress(s, self.job_id, self.worker_id, **values):
                self.lost.set()
            elif transitions.cancel_requested(s, self.job_id):
                self.cancel.set()

    def on_phase(self, phase: str) -> None:
        self.phase = phase
        self.started = time.monotonic() if phase == "training" else self.started
        self._write(
            phase=phase,
            epoch=self.epoch,
            total_epochs=self.total_epochs,
            step=self.done_steps,
            total_steps=self.total_steps,
            eta_seconds=0.0 if phase == "exporting" else None,
        )

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.epoch = epoch
        self.done_steps = (epoch - 1) * steps_per_epoch + step
        self.total_steps = total = self.total_epochs * steps_per_epoch
        now = time.monotonic()
        if (
            now - self.last_write < self.settings.progress_interval_seconds
            and step != steps_per_epoch
        ):
            return
        self.last_write = now
        elapsed = now - self.started
        eta = elapsed / self.done_steps * (total - self.done_steps) if self.done_steps else None
        self._write(
            phase=self.phase,
            epoch=epoch,
            total_epochs=self.total_epochs,
            step=self.done_steps,
            total_steps=total,
            eta_seconds=eta,
        )

    def on_epoch_end(self, metrics: dict[str, Any], best: dict[str, Any]) -> None:
        with session_scope(self.settings) as s:
            if not transitions.record_epoch(s, self.job_id, self.worker_id, metrics, best):
                self.lost.set()
        self.history.append(metrics)
        try:  # live curves; a plotting hiccup must never fail the job
            self.store.put_bytes(
                f"jobs/{self.job_id}/plots/curves.png", curves_png(self.history, self.job_id)
            )
        except Exception:  # noqa: BLE001
            log.warning("could not render curves for %s", self.job_id, exc_info=True)

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        """Every epoch: to the object store first, then the row points at it. A store that is
        briefly unreachable is retried; one that stays down costs this checkpoint only (the
        job trains on; a crash would resume from an older one)."""
        start = time.monotonic()
        key = self.checkpoint_key
        with tempfile.NamedTemporaryFile(suffix=".pt") as f:
            torch.save(state, f.name)
            for attempt in range(1, 4):
                try:
                    self.store.put_file(key, Path(f.name))
                    break
                except StorageError:
                    log.warning("checkpoint write %d/3 for %s failed", attempt, self.job_id)
                    time.sleep(2.0 * attempt)
            else:
                log.error("job %s: checkpoint of epoch %s skipped", self.job_id, state["epoch"])
                return
        with session_scope(self.settings) as s:
            if not transitions.set_checkpoint(s, self.job_id, self.worker_id, key):
                self.lost.set()
        self.checkpoint_seconds.append(time.monotonic() - start)

    def checkpoint_on_stop(self) -> bool:
        """Mid-epoch checkpoint only when the job will be resumed: the worker is shutting
        down. Not on cancel (nothing resumes) nor when the job was lost (not ours)."""
        return SHUTTING_DOWN.is_set() and not self.lost.is_set() and not self.cancel.is_set()

    def should_stop(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.time_limited.set()
        return (
            self.lost.is_set()
            or self.cancel.is_set()
            or self.time_limited.is_set()
            or SHUTTING_DOWN.is_set()
        )


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
        on_hard_limit: Any = _kill_this_process,
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


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        # Deterministic: the same batch size would run out again. Not retried.
        return ErrorCode.OUT_OF_MEMORY.value
    if isinstance(exc, WeightsUnavailable):
        return ErrorCode.WEIGHTS_UNAVAILABLE.value
    if isinstance(exc, StorageError):
        return ErrorCode.STORAGE_UNAVAILABLE.value
    if isinstance(exc, (ValueError, KeyError, OSError)):
        return ErrorCode.DATA_ERROR.value
    return ErrorCode.TRAINING_FAILED.value


def _fail(job_id: str, worker_id: str, settings: Settings, exc: BaseException) -> str:
    """A deterministic failure: recorded at once with its code, message and traceback."""
    log.error("job %s failed", job_id, exc_info=exc)
    with session_scope(settings) as s:
        transitions.fail(
            s,
            job_id,
            code=_error_code(exc),
            message=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            worker_id=worker_id,
        )
    return "failed"


def run_job(job_id: str, settings: Settings | None = None, worker_id: str | None = None) -> str:
    """Train job `job_id` if this worker can claim it. Returns the job's final status here."""
    settings = settings or get_settings()
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with session_scope(settings) as s:
        claimed, limit = transitions.claim_within_limit(s, job_id, worker_id, settings)
        if claimed == "deferred":
            transitions.defer(s, job_id)
            send_train(job_id, settings, countdown=settings.tenant_slot_retry_seconds)
            log.info("job %s waits: its tenant runs %d jobs, its limit", job_id, limit)
            return "deferred"
        if claimed != "claimed":
            job = s.get(Job, job_id)
            log.info("job %s not claimed (status %s)", job_id, job.status if job else "missing")
            return job.status if job else "missing"
        job = s.get(Job, job_id)
        assert job is not None
        ds = s.get(Dataset, job.dataset_id)
        assert ds is not None
        try:
            config = parse_job_config(job.config)
        except ConfigInvalid as exc:  # deterministic: refused, never silently trimmed
            bad_config: ConfigInvalid | None = exc
        else:
            bad_config = None
        archive_key, index_key, dataset_id = ds.archive_key, ds.index_key, ds.id
        checkpoint_key, dataset_sha = job.checkpoint_key, job.config.get("dataset_sha256")
        max_duration = float(
            job.config.get("max_duration_seconds") or settings.job_max_duration_seconds
        )
        prior_seconds = job.run_seconds or 0.0
        attempt = job.attempts

    if bad_config is not None:
        return _fail(job_id, worker_id, settings, bad_config)
    attempt_started = time.monotonic()
    soft_deadline = attempt_started + max(0.0, max_duration - prior_seconds)
    reporter = DbReporter(
        job_id, worker_id, settings, config.epochs, deadline=soft_deadline, attempt=attempt
    )
    heartbeat = Heartbeat(
        job_id,
        worker_id,
        settings,
        reporter,
        hard_deadline=soft_deadline + settings.job_stop_grace_seconds,
    )
    heartbeat.start()

    def ran() -> float:
        return time.monotonic() - attempt_started

    workdir = Path(tempfile.mkdtemp(prefix=f"{job_id}-"))
    try:
        store = get_store(settings)
        reporter.on_phase("preparing")
        archive, index = fetch_dataset(settings, store, dataset_id, archive_key, index_key)
        data = prepare(archive, index, config, archive.parent)
        resume = None
        if checkpoint_key and store.exists(checkpoint_key):
            ckpt = workdir / "resume.pt"
            store.get_file(checkpoint_key, ckpt)
            try:
                resume = load_checkpoint(ckpt)
            except CheckpointRefused as exc:  # data only: never executed, never retried
                log.warning(
                    "job %s checkpoint %s refused: %s; training from the start",
                    job_id,
                    checkpoint_key,
                    exc,
                )
                resume = None
            else:
                log.info(
                    "job %s resumes from %s epoch %s", job_id, resume["phase"], resume["epoch"]
                )

        weights = WeightsSource(
            settings.weights_dir,
            settings.allow_weight_downloads,
            settings.resolved_torch_hub_dir,
            settings.resolved_hf_cache,
        )
        result = fit(
            config,
            data,
            reporter,
            weights=weights,
            num_workers=settings.dataloader_workers,
            resume=resume,
        )
        if reporter.lost.is_set():
            raise JobLost(f"job {job_id} is no longer owned by {worker_id}")
        if SHUTTING_DOWN.is_set() and not reporter.cancel.is_set() and result.stopped:
            with session_scope(settings) as s:
                released = transitions.release(s, job_id, worker_id, "worker shut down", ran())
            if released:
                send_train(job_id, settings)
                log.warning("job %s handed back on shutdown; resumes from its checkpoint", job_id)
            return "interrupted"
        canceled = reporter.cancel.is_set()
        time_limited = reporter.time_limited.is_set() and not canceled
        limit_message = (
            f"the job reached its time limit of {max_duration:g}s (max_duration_seconds) "
            f"in epoch {reporter.epoch}; "
            + ("the best model so far is kept" if result.best else "no epoch had finished")
        )
        keep = bool(result.best)
        if canceled:
            with session_scope(settings) as s:
                keep &= s.scalar(select(Job.cancel_mode).where(Job.id == job_id)) == "stop-and-keep"
        if (canceled or time_limited) and not keep:  # ends with nothing to download
            store.delete_prefix(f"jobs/{job_id}")
            with session_scope(settings) as s:
                if canceled:
                    transitions.finish_canceled(s, job_id, worker_id, None)
                else:
                    transitions.finish_time_limited(s, job_id, worker_id, None, limit_message)
            log.info("job %s %s; nothing kept", job_id, "canceled" if canceled else "timed out")
            return "canceled" if canceled else "failed"

        reporter.on_phase("exporting")
        metadata = build_metadata(
            config,
            result.classes,
            result.best,
            {
                "job_id": job_id,
                "dataset_id": dataset_id,
                "dataset_sha256": dataset_sha,
            },
        )
        files = export_model(result.model, metadata, workdir / "model")
        validation = result.report.get("validation", {})
        if "confusion_matrix" in validation:
            store.put_bytes(
                f"jobs/{job_id}/plots/confusion_matrix.png",
                confusion_matrix_png(validation["confusion_matrix"], result.classes),
            )
        prefix = f"jobs/{job_id}/model"
        keys = {}
        for name, path in files.items():
            key = f"{prefix}/{name}"
            store.put_file(key, path)
            keys[name] = key
        outcome = {
            "bundle_key": keys["model.zip"],
            "safetensors_key": keys["model.safetensors"],
            "torchscript_key": keys["model.torchscript.pt"],
            "metadata_key": keys["metadata.json"],
            "best": result.best,
            "report": result.report,
            "training": {
                **result.extra,
                "stopped_reason": result.stopped_reason,
                "checkpoint_seconds": [round(t, 3) for t in reporter.checkpoint_seconds],
            },
            "classes": result.classes,
            "device": result.device,
            "split": data.split,
        }
        with session_scope(settings) as s:
            if canceled:  # stop-and-keep: the best epoch so far is the model
                done = transitions.finish_canceled(s, job_id, worker_id, outcome)
            elif time_limited:
                done = transitions.finish_time_limited(s, job_id, worker_id, outcome, limit_message)
            else:
                done = transitions.succeed(s, job_id, worker_id, outcome)
            if not done:
                raise JobLost(f"job {job_id} could not be recorded by {worker_id}")
        store.delete_prefix(checkpoint_prefix(job_id))  # one final model, not two
        status = "canceled" if canceled else "failed" if time_limited else "succeeded"
        log.info("job %s: %s: %s", job_id, limit_message if time_limited else status, result.best)
        return status
    except JobLost:
        log.warning("job %s: lost ownership, stopping without recording", job_id)
        return "lost"
    except TRANSIENT as exc:
        if isinstance(exc, StorageNotFound):
            return _fail(job_id, worker_id, settings, exc)
        # Storage or database briefly unreachable: hand the job back and retry it later
        # (from its checkpoint), within the attempt budget.
        with session_scope(settings) as s:
            if attempt < settings.max_attempts and transitions.release(
                s, job_id, worker_id, f"transient failure: {type(exc).__name__}: {exc}", ran()
            ):
                delay = min(60.0, 5.0 * attempt)
                send_train(job_id, settings, countdown=delay)
                log.warning("job %s: transient failure (%s); retrying in %.0fs", job_id, exc, delay)
                return "retrying"
            transitions.fail(
                s,
                job_id,
                code=_error_code(exc),
                message=f"{type(exc).__name__}: {exc} (after {attempt} attempts)",
                traceback=traceback.format_exc(),
                worker_id=worker_id,
            )
        return "failed"
    except Exception as exc:
        return _fail(job_id, worker_id, settings, exc)
    finally:
        heartbeat.stopped.set()
        shutil.rmtree(workdir, ignore_errors=True)


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    run_job(job_id)

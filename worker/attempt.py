"""One attempt at a job, as the lifecycle steps see it: what the claim read from the rows,
the attempt's reporter, lease and scratch folder, and what training produced."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.jobspec import ConfigInvalid, JobConfig
from core.settings import Settings
from core.storage import ObjectStore, get_store
from worker.ending import Observed
from worker.lease import Heartbeat
from worker.reporting import DbReporter
from worker.training import scratch
from worker.training.data import PreparedData
from worker.training.fit import FitResult


@dataclass(frozen=True)
class Claim:
    """What the job's rows say once this worker owns it; nothing is read from them again."""

    job_id: str
    config: JobConfig | ConfigInvalid  # a stored config this code cannot run
    dataset_id: str
    archive_key: str
    index_key: str
    checkpoint_key: str | None
    dataset_sha: str | None
    max_duration: float  # seconds, over all attempts
    prior_seconds: float  # spent by earlier attempts
    attempt: int


@dataclass
class Attempt:
    claim: Claim
    worker_id: str
    settings: Settings
    store: ObjectStore
    reporter: DbReporter
    heartbeat: Heartbeat
    workdir: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def job_id(self) -> str:
        return self.claim.job_id

    def ran(self) -> float:
        return time.monotonic() - self.started

    def observed(self, **seen: Any) -> Observed:
        return Observed(attempt=self.claim.attempt, max_attempts=self.settings.max_attempts, **seen)


@dataclass(frozen=True)
class Trained:
    config: JobConfig
    data: PreparedData
    result: FitResult


def begin(claimed: Claim, worker_id: str, settings: Settings) -> Attempt:
    """The attempt's reporter and lease; the soft time limit counts earlier attempts."""
    started = time.monotonic()
    soft_deadline = started + max(0.0, claimed.max_duration - claimed.prior_seconds)
    epochs = claimed.config.epochs if isinstance(claimed.config, JobConfig) else 0
    reporter = DbReporter(
        claimed.job_id,
        worker_id,
        settings,
        epochs,
        deadline=soft_deadline,
        attempt=claimed.attempt,
    )
    heartbeat = Heartbeat(
        claimed.job_id,
        worker_id,
        settings,
        reporter,
        hard_deadline=soft_deadline + settings.job_stop_grace_seconds,
    )
    workdir = scratch.make(claimed.job_id)  # removed by a sweep if this worker is killed
    return Attempt(
        claimed, worker_id, settings, get_store(settings), reporter, heartbeat, workdir, started
    )

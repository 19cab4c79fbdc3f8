"""The Celery tasks, by the names the API sends (core/queue.py). Each is one call into the
worker's glue: worker/lifecycle.py trains a job, worker/preview.py renders a preview."""

from __future__ import annotations

from typing import Any

from core.queue import PREVIEW_TASK, TRAIN_TASK
from worker.celery_app import app
from worker.lifecycle import run_job
from worker.preview import render_to_store

__all__ = ["render_preview", "run_job", "train_job"]


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    run_job(job_id)


@app.task(name=PREVIEW_TASK)
def render_preview(
    dataset_id: str, augmentation: dict[str, Any], image_size: int, seed: int, samples: int
) -> None:
    render_to_store(dataset_id, augmentation, image_size, seed, samples)

"""The Celery tasks, by the names the API sends (core/queue.py). Each is one call into the
worker's glue: worker/lifecycle.py trains a job, worker/preview.py renders a preview,
worker/explain.py explains a prediction, worker/webhooks.py posts a webhook."""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Reject

from core.queue import EXPLAIN_TASK, PREVIEW_TASK, TRAIN_TASK, WEBHOOK_TASK
from worker.celery_app import SHUTTING_DOWN, app
from worker.explain import explain_to_store
from worker.lifecycle import run_job
from worker.preview import render_to_store
from worker.webhooks import deliver

__all__ = ["deliver_webhook", "explain", "render_preview", "run_job", "train_job"]

log = logging.getLogger(__name__)


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    if SHUTTING_DOWN.is_set():
        # A worker that is stopping may still be handed a task (the one it just re-sent for
        # the job it handed back, most often). Claiming it would cost the job an attempt
        # only to hand it back again: the message goes back to the queue, untouched, for a
        # worker that stays.
        log.info("job %s left on the queue: this worker is shutting down", job_id)
        raise Reject("worker shutting down", requeue=True)
    run_job(job_id)


@app.task(name=PREVIEW_TASK)
def render_preview(
    dataset_id: str, augmentation: dict[str, Any], image_size: int, seed: int, samples: int
) -> None:
    render_to_store(dataset_id, augmentation, image_size, seed, samples)


@app.task(name=EXPLAIN_TASK)
def explain(job_id: str, explanation: str) -> None:
    explain_to_store(job_id, explanation)


@app.task(name=WEBHOOK_TASK)
def deliver_webhook(delivery_id: str) -> None:
    deliver(delivery_id)

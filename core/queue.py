"""A light Celery client: the API sends tasks by name and never imports worker code."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from celery import Celery

from core import fleet
from core.logs import request_id
from core.settings import Settings, get_settings

TRAIN_TASK = "finetune.train_job"  # on settings.task_queue or gpu_queue (core/fleet.py)
PREVIEW_TASK = "finetune.render_preview"  # on settings.light_queue
EXPLAIN_TASK = "finetune.explain"  # on settings.light_queue
WEBHOOK_TASK = "finetune.deliver_webhook"  # on settings.light_queue
REQUEST_ID_HEADER = "finetune_request_id"


def trace_headers() -> dict[str, str]:
    """The request id in context travels with the task, so that the worker's log lines for
    it name the request that caused them (core/logs.py)."""
    rid = request_id.get()
    return {REQUEST_ID_HEADER: rid} if rid else {}


@lru_cache(maxsize=4)
def _client(broker_url: str) -> Celery:
    app = Celery("finetune-client", broker=broker_url)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        task_ignore_result=True,
    )
    return app


def client(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    return _client(settings.resolved_broker_url)


def send_train(
    job_id: str, settings: Settings | None = None, countdown: float = 0, queue: str | None = None
) -> None:
    """`queue`: default, the one the job's `device` and the live workers choose now."""
    settings = settings or get_settings()
    client(settings).send_task(
        TRAIN_TASK,
        args=[job_id],
        queue=queue or fleet.queue_for_job(settings, job_id),
        countdown=countdown or None,
        headers=trace_headers(),
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5},
    )


PREVIEW_SUFFIXES = (".png", ".pending", ".error.json")


def previews_prefix(dataset_id: str) -> str:
    """The dataset's previews folder (deleted with the dataset's own prefix)."""
    return f"datasets/{dataset_id}/previews"


def preview_key(
    dataset_id: str, augmentation: dict[str, Any], image_size: int, seed: int, samples: int
) -> str:
    """Where a preview lives in the store, without its suffix (`.png`, `.pending`,
    `.error.json`): the API and the worker both derive it from the parameters."""
    params = json.dumps([augmentation, image_size, seed, samples], sort_keys=True)
    digest = hashlib.sha256(params.encode()).hexdigest()[:24]
    return f"{previews_prefix(dataset_id)}/{digest}"


def send_preview(
    dataset_id: str,
    augmentation: dict[str, Any],
    image_size: int,
    seed: int,
    samples: int,
    settings: Settings | None = None,
) -> None:
    settings = settings or get_settings()
    client(settings).send_task(
        PREVIEW_TASK,
        args=[dataset_id, augmentation, image_size, seed, samples],
        queue=settings.light_queue,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5},
    )


# What the store holds per explanation, next to its key: the API writes the input (the
# model's crop of the decoded upload, as PNG) and the request, then the pending marker; the
# worker writes the overlay, then the prediction (whose presence means done), or the error.
EXPLANATION_SUFFIXES = (
    ".input.png",
    ".request.json",
    ".pending",
    ".png",
    ".json",
    ".error.json",
)


def explanations_prefix(job_id: str) -> str:
    """The job's explanations folder (under the job's own prefix)."""
    return f"jobs/{job_id}/explanations"


def explanation_id(
    pixels: bytes, shape: tuple[int, ...], target: str | None, model_key: str
) -> str:
    """The same image, target and model give the same id: a repeated request is served from
    the store. `pixels` are the exact uint8 pixels the model sees, so two uploads that decode
    to the same input (a PNG and its lossless re-encoding) share an explanation."""
    digest = hashlib.sha256()
    digest.update(json.dumps([list(shape), target, model_key]).encode())
    digest.update(pixels)
    return digest.hexdigest()[:32]


def explanation_key(job_id: str, explanation: str) -> str:
    """Where an explanation lives in the store, without its suffix (EXPLANATION_SUFFIXES)."""
    return f"{explanations_prefix(job_id)}/{explanation}"


def send_explain(job_id: str, explanation: str, settings: Settings | None = None) -> None:
    """The worker reads what to explain from the store (`<key>.request.json`, `.input.png`)
    and the model from the job row: only ids go through the broker."""
    settings = settings or get_settings()
    client(settings).send_task(
        EXPLAIN_TASK,
        args=[job_id, explanation],
        queue=settings.light_queue,
        headers=trace_headers(),
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5},
    )


def send_webhook(delivery_id: str, settings: Settings | None = None, countdown: float = 0) -> None:
    """One try of a webhook delivery; the worker reads the rest from its row."""
    settings = settings or get_settings()
    client(settings).send_task(
        WEBHOOK_TASK,
        args=[delivery_id],
        queue=settings.light_queue,
        countdown=countdown or None,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5},
    )


def check_broker(settings: Settings | None = None) -> None:
    """Raise if the broker cannot be reached."""
    with client(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)

"""A light Celery client: the API sends tasks by name and never imports worker code."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from celery import Celery

from core.settings import Settings, get_settings

TRAIN_TASK = "finetune.train_job"  # on settings.task_queue
PREVIEW_TASK = "finetune.render_preview"  # on settings.light_queue


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


def send_train(job_id: str, settings: Settings | None = None, countdown: float = 0) -> None:
    settings = settings or get_settings()
    client(settings).send_task(
        TRAIN_TASK,
        args=[job_id],
        queue=settings.task_queue,
        countdown=countdown or None,
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


def check_broker(settings: Settings | None = None) -> None:
    """Raise if the broker cannot be reached."""
    with client(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)

"""A light Celery client: the API sends tasks by name and never imports worker code."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from core.settings import Settings, get_settings

TRAIN_TASK = "finetune.train_job"


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


def check_broker(settings: Settings | None = None) -> None:
    """Raise if the broker cannot be reached."""
    with client(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)

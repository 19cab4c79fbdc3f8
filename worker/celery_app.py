"""The Celery application the workers run: `celery -A worker.celery_app worker -Q QUEUES`.

Two queues: TASK_QUEUE (training, `finetune.train_job`) and LIGHT_QUEUE (short torch tasks that
must not wait behind training: `finetune.render_preview`, `finetune.explain`,
`finetune.deliver_webhook`). A worker
consumes the queues its `-Q` names: `-Q "$TASK_QUEUE,$LIGHT_QUEUE"` for both, or one each for
separate workers.

Settings chosen for long training tasks:
- acks_late + reject_on_worker_lost: a task whose worker dies is redelivered, not lost;
- prefetch 1: a worker never holds a second job hostage while it trains;
- results ignored: the job row in the database is the truth about a job;
- the visibility timeout (Redis) is longer than the hard job limit, so the broker does not
  redeliver a job that is still training; and even when it does, the guarded claim in
  the database makes the second copy exit without training;
- no Celery time limits: the solo pool cannot enforce them and they are per task, not per
  job. Each job's soft and hard limits are enforced by worker/lease.py and
  worker/reporting.py instead;
- nothing here touches CUDA: the first CUDA call happens inside the task, after any fork.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from celery import Celery, signals

from core.logs import configure_logging
from core.queue import EXPLAIN_TASK, PREVIEW_TASK, WEBHOOK_TASK
from core.settings import get_settings
from worker import metrics  # noqa: F401  (its signals: /metrics, the ids on log lines)

if TYPE_CHECKING:
    from worker.capabilities import Publisher

settings = get_settings()

app = Celery("finetune", broker=settings.resolved_broker_url, include=["worker.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue=settings.task_queue,
    task_routes={
        PREVIEW_TASK: {"queue": settings.light_queue},
        EXPLAIN_TASK: {"queue": settings.light_queue},
        WEBHOOK_TASK: {"queue": settings.light_queue},
    },
    broker_connection_retry_on_startup=True,
    # Redis only (kombu's SQLAlchemy transport hands its options to create_engine).
    broker_transport_options=(
        {"visibility_timeout": settings.broker_visibility_timeout_seconds}
        if settings.resolved_broker_url.startswith(("redis", "rediss"))
        else {}
    ),
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)
configure_logging(settings)


# Set from the SIGTERM handler (warm shutdown): the job in hand stops at its next step, is
# handed back (`interrupted`, requeued) and resumes elsewhere from its last checkpoint.
SHUTTING_DOWN = threading.Event()


@signals.worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    SHUTTING_DOWN.set()  # only an Event.set(): this runs inside a signal handler


_PUBLISHERS: list[Publisher] = []  # this process's (one), withdrawn at a clean stop


@signals.worker_ready.connect
def _start_reaper(sender: object = None, **_: object) -> None:
    """Each worker also looks for jobs whose worker died (see core/reaper.py), keeps its
    host's dataset cache tidy (see worker/cache.py), removes the scratch folders of workers
    killed on this host, at start and each round (see worker/training/scratch.py), and
    publishes what it can run, beat by beat (see worker/capabilities.py)."""
    from core.reaper import Reaper
    from worker.cache import tidy
    from worker.capabilities import Publisher, worker_identity
    from worker.training import scratch

    def sweep_scratch(_: object) -> None:  # what workers killed on this host left on disk
        scratch.sweep()

    try:
        sweep_scratch(settings)
    except Exception:  # noqa: BLE001 - housekeeping: the reaper's rounds try again
        logging.getLogger(__name__).warning("scratch sweep failed", exc_info=True)

    for warning in settings.warnings():
        logging.getLogger(__name__).warning("%s", warning)
    publisher = Publisher(settings, *worker_identity(sender))
    publisher.start()
    _PUBLISHERS.append(publisher)
    Reaper(settings, also=[tidy, publisher, sweep_scratch]).start()


@signals.worker_shutdown.connect
def _withdraw(**_: object) -> None:
    for publisher in _PUBLISHERS:
        publisher.withdraw()

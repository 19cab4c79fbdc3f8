"""What the whole service is doing, read at scrape time: jobs by status (one GROUP BY on
the jobs table) and the depth of the two queues (from the broker).

Read by the API's /metrics, not by each worker: these are global numbers, and N workers
would each report the same ones. A part that cannot be read (the broker is down) is left
out of that scrape, and `finetune_scrape_errors_total{part}` says so, instead of failing
the whole page or reporting a made-up zero.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from core.db import session_scope
from core.models import Job, JobStatus
from core.queue import client
from core.settings import Settings

log = logging.getLogger(__name__)

SCRAPE_ERRORS = Counter(
    "finetune_scrape_errors",
    "Parts of /metrics that could not be read at a scrape (db: job counts; broker: queues)",
    ["part"],
)


def job_counts(settings: Settings) -> dict[str, int]:
    """Jobs by status; every status is present (zero when none), so a rate never gaps."""
    counts = {status.value: 0 for status in JobStatus}
    with session_scope(settings) as s:
        for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status)):
            counts[status] = n
    return counts


def queue_names(settings: Settings) -> list[str]:
    """The queues workers consume: training, light and (where configured) the GPU queue."""
    names = (settings.task_queue, settings.light_queue, getattr(settings, "gpu_queue", ""))
    return list(dict.fromkeys(name for name in names if name))


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each queue, as the broker counts them (Redis: LLEN over the
    queue's keys; the embedded SQLite broker: its visible rows; AMQP: message_count). A
    queue the broker has not created yet (Redis deletes an empty list) holds nothing."""
    from kombu.exceptions import ChannelError

    depths: dict[str, int] = {}
    with client(settings).connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        for queue in queue_names(settings):
            channel = conn.channel()
            try:
                depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:
                depths[queue] = 0
            finally:
                channel.close()
    return depths


class ServiceCollector(Collector):
    """`finetune_jobs{status}` and `finetune_queue_depth{queue}`, read at each scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        try:
            counts = job_counts(self.settings)
        except Exception:  # noqa: BLE001 - a scrape never fails on one part
            SCRAPE_ERRORS.labels("db").inc()
            log.warning("metrics: could not count jobs", exc_info=True)
        else:
            jobs = GaugeMetricFamily("finetune_jobs", "Jobs by status", labels=["status"])
            for status, n in sorted(counts.items()):
                jobs.add_metric([status], n)
            yield jobs
        try:
            depths = queue_depths(self.settings)
        except Exception:  # noqa: BLE001
            SCRAPE_ERRORS.labels("broker").inc()
            log.warning("metrics: could not read the queues' depth", exc_info=True)
        else:
            depth = GaugeMetricFamily(
                "finetune_queue_depth", "Tasks waiting in a broker queue", labels=["queue"]
            )
            for queue, n in depths.items():
                depth.add_metric([queue], n)
            yield depth

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read lazily: registering must not touch the database

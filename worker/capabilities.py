"""What this worker can run, published to the `workers` table (core/fleet.py) when it
starts and on every round of its housekeeping loop (core/reaper.py), withdrawn when it
stops cleanly: the API checks submits and routes jobs by these rows, not by its own host.

The device is probed in a child process: CUDA initialised in the worker's main process
would be inherited, broken, by forked children (a prefork pool, data loaders), and the
Celery app promises that nothing touches CUDA before a task runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any

from core import fleet
from core.settings import Settings
from core.weights import usable_backbones

log = logging.getLogger(__name__)

# Runs in a child: prints the device this process would train on.
_PROBE = """
import json, os, torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out = {"device_kind": "cuda", "device_name": p.name, "memory_bytes": p.total_memory}
else:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = {"device_kind": "cpu", "device_name": "cpu", "memory_bytes": mem}
print(json.dumps(out))
"""


def probe_device(timeout: float = 120.0) -> dict[str, Any]:
    """{"device_kind", "device_name", "memory_bytes"} as this worker's environment
    (CUDA_VISIBLE_DEVICES included) sees it."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except Exception:  # noqa: BLE001 - a worker that cannot tell says CPU, the safe claim
        log.warning("could not probe the device; publishing a CPU", exc_info=True)
        return {"device_kind": "cpu", "device_name": "cpu (unprobed)", "memory_bytes": None}


def capabilities(
    settings: Settings, queues: list[str], device: dict[str, Any]
) -> fleet.Capabilities:
    return fleet.Capabilities(
        hostname=socket.gethostname(),
        queues=sorted(queues),
        device_kind=str(device["device_kind"]),
        device_name=str(device["device_name"])[:200],
        memory_bytes=device.get("memory_bytes"),
        backbones=usable_backbones(settings),  # re-read each beat: `weights pull` adds some
    )


class Publisher:
    """Publishes once at start (in a thread: the probe imports torch), then on each call
    (a reaper round). Never raises: a worker that cannot publish still trains."""

    def __init__(self, settings: Settings, worker_id: str, queues: list[str]):
        self.settings = settings
        self.worker_id = worker_id
        self.queues = queues
        self.device: dict[str, Any] | None = None
        self.__name__ = "publish capabilities"  # the reaper logs a failed round by name

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.first, name="capabilities", daemon=True)
        thread.start()
        return thread

    def first(self) -> None:
        self.device = probe_device()
        self(self.settings)
        log.info(
            "worker %s publishes %s (%s), queues %s",
            self.worker_id,
            self.device["device_kind"],
            self.device["device_name"],
            ",".join(self.queues),
        )

    def __call__(self, settings: Settings) -> None:
        if self.device is None:  # still probing
            return
        try:
            fleet.publish(
                settings, self.worker_id, capabilities(settings, self.queues, self.device)
            )
        except Exception:  # noqa: BLE001 - the next round tries again
            log.warning("could not publish this worker's capabilities", exc_info=True)

    def withdraw(self) -> None:
        try:
            fleet.withdraw(self.settings, self.worker_id)
        except Exception:  # noqa: BLE001 - a worker that cannot say goodbye goes stale
            log.warning("could not withdraw this worker's row", exc_info=True)


def worker_identity(consumer: Any) -> tuple[str, list[str]]:
    """(Celery node name, the queues it consumes) from the `worker_ready` sender."""
    name = getattr(consumer, "hostname", None) or f"{os.getpid()}@{socket.gethostname()}"
    try:
        queues = list(consumer.app.amqp.queues.consume_from)
    except Exception:  # noqa: BLE001
        queues = []
    return str(name), queues

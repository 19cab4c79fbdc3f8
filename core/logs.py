"""Log lines that can be followed across processes: every line carries the request id of the
HTTP request it belongs to and the job id of the job it is about.

The ids live in context variables: the API's middleware sets `request_id` for the request
(service/observability.py); `core.queue` sends it with a job's task as a header; the worker
sets both ids around each task (worker/metrics.py). A filter copies them onto every record,
so `log.info("...")` anywhere needs no extra arguments.

LOG_FORMAT=json writes one JSON object a line (for a log collector); `text` (the default)
is for a terminal and appends the ids only when they are set.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from core.settings import Settings

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

# A caller's X-Request-ID is kept only when it is short and plain, so that it can neither
# forge log structure nor grow without bound; anything else gets a fresh id.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(ids)s"


def accept_request_id(given: str | None) -> str:
    """The caller's id when it is safe to log, else a new one."""
    if given and _SAFE_ID.match(given):
        return given
    return uuid.uuid4().hex


class ContextFilter(logging.Filter):
    """Copies the ids in context onto the record (`record.request_id`, `record.job_id`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or request_id.get()
        jid = getattr(record, "job_id", None) or job_id.get()
        record.request_id, record.job_id = rid, jid
        parts = [f"{k}={v}" for k, v in (("request_id", rid), ("job_id", jid)) if v]
        record.ids = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601), level, logger, message, request_id,
    job_id, and the traceback as `exc_info` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
            "process": record.process,
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(settings: Settings) -> None:
    """The root handler for this process, in LOG_FORMAT. Replaces what was there, so that
    calling it twice (the app factory in tests) never doubles the lines."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_finetune", False):
            root.removeHandler(old)
    handler._finetune = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(settings.log_level)

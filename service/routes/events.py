"""Live events of a job as server-sent events: `GET /v1/jobs/{id}/events`.

The job row and its metrics rows are the truth, so the stream is a cheap poll of them every
EVENTS_POLL_SECONDS (the row's status and progress columns, and the metrics rows not sent
yet), each in a short session on a worker thread: no connection is held between polls.

Events, in this order within a poll:
- `status`: status, attempts, cancel_requested, error; sent on connect and on each change;
- `progress`: phase, epoch, step, fraction, eta; sent on connect and on each change;
- `metrics`: one per epoch row (GET /v1/jobs/{id}/metrics's shape), oldest first;
- `end`: the job has ended (succeeded, failed, canceled); the stream then closes.
A comment (`: keep-alive`) goes out after KEEPALIVE_SECONDS without an event, so proxies
keep the connection; after EVENTS_MAX_STREAM_SECONDS the stream closes and the client
reconnects (EventSource does so on its own after `retry` ms).

Event ids: every event carries the cursor `id: <n>`, the id of the last `job_metrics` row
sent (0 before any). Row ids only grow, so ids never decrease, and a reconnect with
`Last-Event-ID: <n>` gets the metrics rows after n, preceded by a fresh `status` and
`progress`: those are state, not history, so the latest snapshot is all a client needs.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from core import jobs
from core.db import session_scope
from core.models import Job, JobMetric, JobStatus
from core.settings import Settings
from core.tenancy import Principal
from service.deps import PathId, ReadDep, SettingsDep
from service.errors import ERROR_RESPONSES
from service.schemas import MetricPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

KEEPALIVE_SECONDS = 15.0
RETRY_MS = 1000
METRICS_PER_POLL = 500
LastEventId = Annotated[
    str | None,
    Header(
        max_length=100,
        description="the id of the last event received: the stream resumes after it (an id "
        "this server did not send replays from the start)",
    ),
]


def _owned(settings: Settings, principal: Principal, job_id: str) -> None:
    with session_scope(settings) as session:
        jobs.get_owned_job(session, principal, job_id)


def _progress(row: Any) -> dict[str, Any]:
    total = row.total_steps or 0
    done = row.status == JobStatus.SUCCEEDED.value
    fraction = 1.0 if done else (min(1.0, row.step / total) if total else 0.0)
    return {
        "phase": row.phase,
        "epoch": row.epoch,
        "total_epochs": row.total_epochs,
        "step": row.step,
        "total_steps": total,
        "fraction": round(fraction, 4),
        "eta_seconds": row.eta_seconds,
    }


def poll(settings: Settings, job_id: str, cursor: int) -> tuple[Any, list[JobMetric]] | None:
    """The job's status and progress columns, then its metrics rows after `cursor` (read
    second, so every row written before the status was recorded is among them)."""
    with session_scope(settings) as session:
        row = session.execute(
            select(
                Job.status,
                Job.attempts,
                Job.cancel_requested,
                Job.error_code,
                Job.error_message,
                Job.phase,
                Job.epoch,
                Job.total_epochs,
                Job.step,
                Job.total_steps,
                Job.eta_seconds,
            ).where(Job.id == job_id)
        ).first()
        if row is None:
            return None
        metrics = session.scalars(
            select(JobMetric)
            .where(JobMetric.job_id == job_id, JobMetric.id > cursor)
            .order_by(JobMetric.id)
            .limit(METRICS_PER_POLL)
        ).all()
        session.expunge_all()
    return row, list(metrics)


def frame(cursor: int, event: str, data: dict[str, Any]) -> str:
    return f"id: {cursor}\nevent: {event}\ndata: {json.dumps(data, default=str)}\n\n"


async def stream(
    request: Request, settings: Settings, job_id: str, cursor: int
) -> AsyncIterator[str]:
    started = last_sent = time.monotonic()
    yield f"retry: {RETRY_MS}\n\n"
    seen_status: dict[str, Any] | None = None
    seen_progress: dict[str, Any] | None = None
    while True:
        polled = await anyio.to_thread.run_sync(poll, settings, job_id, cursor)
        if polled is None:
            return
        row, metrics = polled
        out: list[str] = []
        error = {"code": row.error_code, "message": row.error_message} if row.error_code else None
        status = {
            "status": row.status,
            "attempts": row.attempts,
            "cancel_requested": row.cancel_requested,
            "error": error,
        }
        if status != seen_status:
            out.append(frame(cursor, "status", status))
            seen_status = status
        progress = _progress(row)
        if progress != seen_progress:
            out.append(frame(cursor, "progress", progress))
            seen_progress = progress
        for metric in metrics:
            cursor = metric.id
            data = MetricPublic.model_validate(metric, from_attributes=True).model_dump(mode="json")
            out.append(frame(cursor, "metrics", data))
        ended = JobStatus(row.status).is_terminal() and len(metrics) < METRICS_PER_POLL
        if ended:
            out.append(frame(cursor, "end", {"status": row.status, "error": error}))
        now = time.monotonic()
        if out:
            yield "".join(out)
            last_sent = now
        elif now - last_sent >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = now
        if ended or now - started >= settings.events_max_stream_seconds:
            return
        if await request.is_disconnected():
            return
        await anyio.sleep(settings.events_poll_seconds)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    request: Request,
    job_id: PathId,
    principal: ReadDep,
    settings: SettingsDep,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    """The job's status, progress and per-epoch metrics as they happen (server-sent events),
    then `end`. Reconnect with `Last-Event-ID` to resume after the last event received."""
    await anyio.to_thread.run_sync(_owned, settings, principal, job_id)  # 404 before streaming
    given = (last_event_id or "").strip()
    cursor = int(given) if given.isascii() and given.isdigit() and len(given) <= 18 else 0
    return StreamingResponse(
        stream(request, settings, job_id, cursor),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )

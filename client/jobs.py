"""Jobs: submit, read, cancel, follow (events, wait), and what a finished job offers
(metrics, report, plots, the model, predictions, explanations, label issues).

Following a job uses the server's event stream (`GET /v1/jobs/{id}/events`, server-sent
events) where the server has it, and polls `GET /v1/jobs/{id}` where it does not, or when
the stream ends or goes quiet before the job does: the caller sees the same events."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from client import models as m
from client._http import ApiError, ProgressCallback, Transport
from client.resources import Image, _drop_none, explain, predict

EVENTS = "/v1/jobs/{job_id}/events"


def _progress_key(job: m.Job) -> tuple[Any, ...]:
    p = job.progress
    return (job.status, p.phase, p.epoch, p.step, p.eta_seconds, job.latest_metrics)


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str, str | None]]:
    """(event type, data, last event id) per server-sent event (the WHATWG format: `event:`,
    `data:` and `id:` lines, a blank line ends one; comments and `retry:` are skipped)."""
    kind, last_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield kind, "\n".join(data), last_id
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                last_id = value
    if data:
        yield kind, "\n".join(data), last_id


def _event(kind: str, text: str) -> m.JobEvent:
    try:
        data = json.loads(text)
    except ValueError:
        data = {"text": text}
    if not isinstance(data, dict):
        data = {"value": data}
    job = None
    candidate = data.get("job", data)
    if isinstance(candidate, dict) and {"id", "status", "dataset_id"} <= candidate.keys():
        job = m.Job.model_validate(candidate)
    return m.JobEvent(type=kind, data=data, job=job)


def _says_terminal(event: m.JobEvent) -> bool:
    status = event.job.status if event.job else event.data.get("status")
    return status in m.TERMINAL


class Jobs:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def submit(self, dataset_id: str, **spec: Any) -> m.Job:
        """Queue a training job on a dataset. `spec`: the job spec's fields (`backbone`,
        `epochs`, `time_budget_seconds`, ...; see `POST /v1/jobs`); None values are left
        out, so the service's auto recipe chooses them."""
        body = {"dataset_id": dataset_id, **_drop_none(**spec)}
        return self._t.call(m.Job, "POST", "/v1/jobs", json=body)

    def get(self, job_id: str) -> m.Job:
        return self._t.call(m.Job, "GET", f"/v1/jobs/{job_id}")

    def list(
        self,
        status: str | None = None,
        dataset_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
        after: str | None = None,
    ) -> m.Jobs:
        """One page, newest first; `after=page.next_cursor` reads the next one by keyset."""
        params = _drop_none(
            status=status, dataset_id=dataset_id, limit=limit, offset=offset, after=after
        )
        return self._t.call(m.Jobs, "GET", "/v1/jobs", params=params)

    def iterate(self, status: str | None = None, dataset_id: str | None = None) -> Iterator[m.Job]:
        """Every job of the caller, newest first, a page of 200 at a time (keyset cursors:
        a job submitted meanwhile is never read twice)."""
        after: str | None = None
        while True:
            page = self.list(status, dataset_id, limit=200, after=after)
            yield from page.data
            if page.next_cursor is None:
                return
            after = page.next_cursor

    def cancel(self, job_id: str, mode: str = "discard") -> m.Job:
        """`discard` keeps nothing; `stop-and-keep` makes the best epoch so far the model."""
        return self._t.call(m.Job, "POST", f"/v1/jobs/{job_id}/cancel", json={"mode": mode})

    def metrics(self, job_id: str) -> m.Metrics:
        return self._t.call(m.Metrics, "GET", f"/v1/jobs/{job_id}/metrics")

    def report(self, job_id: str) -> m.JobReport:
        return self._t.call(m.JobReport, "GET", f"/v1/jobs/{job_id}/report")

    def plot(self, job_id: str, name: str) -> bytes:
        """A PNG plot of a finished job (e.g. `curves`, `confusion_matrix`)."""
        return self._t.get_bytes(f"/v1/jobs/{job_id}/plots/{name}.png")

    def download(
        self,
        job_id: str,
        dest: str | os.PathLike[str] | None = None,
        format: str = "zip",  # noqa: A002 - the API's name for it
        progress: ProgressCallback | None = None,
    ) -> Path:
        """The model: `zip` (everything), `onnx`, `onnx_int8`, `safetensors`,
        `torchscript`, `metadata` or `card`."""
        return self._t.download(
            f"/v1/jobs/{job_id}/model",
            dest,
            params={"format": format},
            fallback_name=f"model.{format}",
            progress=progress,
        )

    def predict(self, job_id: str, images: Sequence[Image], top_k: int = 5) -> m.Predictions:
        return predict(self._t, f"/v1/jobs/{job_id}/predict", images, top_k)

    def explain(
        self, job_id: str, image: Image, target: str | None = None, timeout: float = 120.0
    ) -> m.Explanation:
        """A Grad-CAM explanation of one image, waited for."""
        return explain(self._t, f"/v1/jobs/{job_id}/explain", image, target, timeout)

    def explanation(self, job_id: str, explanation_id: str) -> m.Explanation:
        path = f"/v1/jobs/{job_id}/explanations/{explanation_id}"
        return self._t.call(m.Explanation, "GET", path)

    def explanation_image(self, job_id: str, explanation_id: str) -> bytes:
        return self._t.get_bytes(f"/v1/jobs/{job_id}/explanations/{explanation_id}.png")

    def label_issues(self, job_id: str, limit: int = 100, offset: int = 0) -> m.LabelIssues:
        params = {"limit": limit, "offset": offset}
        return self._t.call(m.LabelIssues, "GET", f"/v1/jobs/{job_id}/label-issues", params=params)

    # --- following a job ----------------------------------------------------------------

    def events(
        self, job_id: str, poll_interval: float = 1.0, stream: bool | None = None
    ) -> Iterator[m.JobEvent]:
        """Events until the job ends. With the server's stream: `status`, `progress`,
        `metrics` (one per epoch) and `end`, resumed after the last one seen when the
        server closes a long stream. Without it (`stream=False`, or an older server): one
        `job` event, carrying the job, per change seen by polling."""
        use_stream = self._t.has_route("GET", EVENTS) if stream is None else stream
        last_id: str | None = None
        ended = False  # a terminal status seen: the stream's close is the end
        while use_stream:
            got_any = False
            try:
                for event, event_id in self._stream(job_id, last_id):
                    got_any, last_id = True, event_id or last_id
                    yield event
                    if event.type == "end":
                        return
                    ended = ended or _says_terminal(event)
                if ended:
                    return
            except ApiError as exc:
                if exc.is_client_error:
                    raise  # the job is not there (404), or the key may not read it
                break  # the stream broke: polling says whether the service is there
            except httpx.TimeoutException:
                break  # quiet past the keep-alives: poll instead
            use_stream = got_any  # a stream that ends at once would only spin
        yield from self._poll(job_id, poll_interval)

    def _stream(self, job_id: str, last_id: str | None) -> Iterator[tuple[m.JobEvent, str | None]]:
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        lines = self._t.lines(EVENTS.format(job_id=job_id), headers)
        for kind, text, event_id in parse_sse(lines):
            yield _event(kind, text), event_id

    def _poll(self, job_id: str, interval: float) -> Iterator[m.JobEvent]:
        seen: tuple[Any, ...] | None = None
        while True:
            job = self.get(job_id)
            key = _progress_key(job)
            if key != seen:
                seen = key
                yield m.JobEvent(type="job", data={"status": job.status}, job=job)
            if job.terminal:
                return
            time.sleep(interval)

    def wait(
        self,
        job_id: str,
        callback: Callable[[m.Job], None] | None = None,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        stream: bool | None = None,
    ) -> m.Job:
        """Block until the job succeeds, fails or is canceled; return it as the server has
        it then. `callback(job)` sees the job at every event: read once, then kept current
        from the stream's `status`, `progress` and `metrics` events (or polled).
        TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job: m.Job | None = None
        for event in self.events(job_id, poll_interval, stream):
            if event.job is not None:
                job = event.job
            elif event.type == "end" or _says_terminal(event):
                job = self.get(job_id)  # the last, from the row itself
            else:
                job = _apply(job or self.get(job_id), event)
            if callback:
                callback(job)
            if job.terminal:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} had not finished after {timeout:.0f}s")
        return self.get(job_id)  # the events ended with the job (never reached otherwise)


def _apply(job: m.Job, event: m.JobEvent) -> m.Job:
    """The job with one stream event applied (the stream sends changes, not the job)."""
    data = event.data
    if event.type == "status":
        fields = ("status", "attempts", "cancel_requested", "error")
        update: dict[str, Any] = {k: data[k] for k in fields if k in data}
        if "error" in update:
            update["error"] = m.JobError.model_validate(data["error"]) if data["error"] else None
        return job.model_copy(update=update)
    if event.type == "progress":
        progress = m.Progress.model_validate({**job.progress.model_dump(), **data})
        return job.model_copy(update={"progress": progress})
    if event.type == "metrics":
        return job.model_copy(update={"latest_metrics": data})
    return job

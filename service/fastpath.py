"""The job poll, `GET /v1/jobs/{id}`, and the job list, `GET /v1/jobs`, answered without
FastAPI's routing, dependency resolution and response validation: the requests clients and
dashboards send all day (BENCHMARKS.md, "API hot path").

Plain ASGI, innermost: the outer middlewares (request id and metrics, body limits, the
Authenticate middleware with its rate limit) have run, so the caller's principal is in the
scope. Only the usual answer is served here: a key with the `read` scope, and a well-formed
id of a job of the caller's tenant, or list parameters each given once and valid. Anything
else (a malformed id or parameter, a missing scope, an unknown job) falls through to the
FastAPI routes in service/routes/jobs.py, which own validation, errors and the OpenAPI
description; both produce byte-identical bodies (tests/integration/test_api_hot_path.py,
test_job_reads_lean.py).

Where the read runs: on SQLite, a poll or a short page on the event loop, else on a
thread (service.deps.in_read); on PostgreSQL, awaited on psycopg's async pool
(core/async_reads.py), and on a thread, with SQLAlchemy's errors, when that fails (then
for LOOP_OFF_SECONDS).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from psycopg_pool import PoolTimeout
from pydantic_core import to_json
from sqlalchemy import Connection
from starlette.types import ASGIApp, Receive, Scope, Send

from core import async_reads, job_reads
from core.db import read_engine
from core.errors import ServiceError
from core.models import JobStatus
from core.settings import Settings, get_settings
from service.deps import ID_PATTERN, in_read
from service.errors import send_error
from service.schemas import job_public_data

log = logging.getLogger("finetune")
LOOP_OFF_SECONDS = 30.0
PATH = re.compile(r"/v1/jobs/(" + ID_PATTERN.strip("^$") + ")")
TEMPLATE = "/v1/jobs/{job_id}"
LIST = "/v1/jobs"
_ID = re.compile(ID_PATTERN)
_CURSOR = re.compile(job_reads.CURSOR_PATTERN)
_DIGITS = re.compile(r"[0-9]{1,10}")
_STATUSES = frozenset(s.value for s in JobStatus)


class Work(NamedTuple):
    """How to answer one request here: `read` on a connection (service.deps.in_read), or,
    on PostgreSQL, `on_loop` awaited on the event loop (core/async_reads.py; if it fails,
    `read` answers, with SQLAlchemy's errors). Either gives the body, or None for the
    route to answer (a 404)."""

    read: Callable[[Connection], bytes | None]
    template: str  # the route's, for the metrics
    short: bool  # as short as a primary-key lookup: inline on SQLite
    on_loop: Callable[[], Awaitable[bytes | None]] | None


def _number(low: int, high: int) -> Callable[[str], int | None]:
    return lambda v: int(v) if _DIGITS.fullmatch(v) and low <= int(v) <= high else None


# Each list parameter's check, as the route declares it: its value, or None when invalid.
_CHECKS: dict[str, Callable[[str], Any]] = {
    "status": lambda v: v if v in _STATUSES else None,
    "dataset_id": lambda v: v if len(v) <= 100 and _ID.fullmatch(v) else None,
    "limit": _number(1, 500),
    "offset": _number(0, 1_000_000_000),
    "after": lambda v: v if _CURSOR.fullmatch(v) else None,
}


def list_args(query: bytes) -> dict[str, Any] | None:
    """The list route's parameters (service/routes/jobs.py: list_jobs) when each is given at
    most once and is valid there; else None, and the route answers (its 422s included)."""
    args: dict[str, Any] = {
        "status": None,
        "dataset_id": None,
        "limit": 50,
        "offset": 0,
        "after": None,
    }
    seen: set[str] = set()
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    for name, value in pairs:
        check = _CHECKS.get(name)
        if check is None:
            continue  # the route ignores parameters it does not know, too
        parsed = check(value)
        if parsed is None or name in seen:
            return None  # invalid, or given twice: the route decides
        seen.add(name)
        args[name] = parsed
    return args


class FastJobPoll:
    def __init__(self, app: ASGIApp, router_app: Any) -> None:
        self.app = app
        self.router_app = router_app  # the FastAPI app: its settings override and the route
        self._routes: dict[str, Any] = {}
        self._loop_off_until = 0.0  # time.monotonic() until which reads go to threads

    def _settings(self) -> Settings:
        # As service.deps._settings: the app's override of get_settings (tests set one).
        overrides = self.router_app.dependency_overrides
        return overrides.get(get_settings, get_settings)()  # type: ignore[no-any-return]

    def route(self, template: str) -> Any:
        """The FastAPI route a path stands for (the metrics label it with its template)."""
        if template not in self._routes:
            from service.observability import flat_routes

            for prefix, route in flat_routes(self.router_app.routes):
                if prefix + getattr(route, "path", "") == template and "GET" in route.methods:
                    self._routes[template] = route
        return self._routes.get(template)

    def _work(self, scope: Scope, principal: Any, settings: Settings) -> Work | None:
        """How to answer a request served here, or None for the routes to answer."""
        path = scope.get("path", "")
        engine = read_engine(settings)
        # On the loop only while the lifespan runs: its end closes this loop's pools.
        on_loop = engine.dialect.driver == "psycopg" and getattr(
            self.router_app.state, "reads_on_loop", False
        )
        if path == LIST:
            args = list_args(scope.get("query_string", b""))
            if args is None:
                return None

            def page_body(rows: Any, count: int, cursor: str | None) -> bytes:
                # JobsPublic's fields, serialised without a model per job (job_public_data).
                data = [job_public_data(row) for row in rows]
                page = {"data": data, "count": count, "next_cursor": cursor}
                return to_json(page, inf_nan_mode="null")  # as the models: NaN is null

            async def page_on_loop() -> bytes:
                return page_body(*await async_reads.job_page(settings, engine, principal, args))

            return Work(
                lambda conn: page_body(*job_reads.job_page(conn, principal, **args)),
                LIST,
                job_reads.short_page(engine, principal, args),
                page_on_loop if on_loop else None,
            )
        match = PATH.fullmatch(path)
        if match is None:
            return None
        job_id = match.group(1)

        def job_body(row: Any) -> bytes | None:
            if row is None:
                return None  # the route answers the 404
            return to_json(job_public_data(row), inf_nan_mode="null")

        def job(conn: Connection) -> bytes | None:
            try:
                return job_body(job_reads.owned_job(conn, principal, job_id))
            except ServiceError:
                return None

        async def job_on_loop() -> bytes | None:
            return job_body(await async_reads.owned_job(settings, engine, principal, job_id))

        return Work(job, TEMPLATE, True, job_on_loop if on_loop else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = (scope.get("state") or {}).get("principal")
        if (
            scope["type"] == "http"
            and scope.get("method") == "GET"
            and principal is not None
            and principal.has("read")
            and (work := self._work(scope, principal, settings := self._settings())) is not None
        ):
            body: bytes | None = None
            done = False
            if work.on_loop is not None and time.monotonic() >= self._loop_off_until:
                try:
                    body, done = await work.on_loop(), True
                except PoolTimeout:  # every connection busy: this request reads on a thread
                    pass
                except Exception:  # noqa: BLE001 - any failure: the thread path answers
                    # Off for a while: a pool that cannot connect would make every request
                    # wait DB_POOL_TIMEOUT_SECONDS first.
                    self._loop_off_until = time.monotonic() + LOOP_OFF_SECONDS
                    log.warning(
                        "reading on the event loop failed; reading on threads for %.0f s",
                        LOOP_OFF_SECONDS,
                        exc_info=True,
                    )
            if not done:
                try:
                    body = await in_read(settings, work.read, bounded=work.short)
                except ServiceError as exc:  # no free database connection: the route's 503
                    await send_error(send, exc)
                    return
            if body is not None:
                scope["route"] = self.route(work.template)
                headers = [
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"application/json"),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

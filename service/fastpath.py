"""The job poll, `GET /v1/jobs/{id}`, and the job list, `GET /v1/jobs`, answered without
FastAPI's routing, dependency resolution and response validation: the requests clients and
dashboards send all day (BENCHMARKS.md, "API hot path").

Plain ASGI, innermost: the outer middlewares (request id and metrics, body limits, the
Authenticate middleware with its rate limit) have run, so the caller's principal is in the
scope. Only the usual answer is served here: a key with the `read` scope, and a well-formed
id of a job of the caller's tenant, or list parameters each given once and valid. Anything
else (a malformed id or parameter, a missing scope, an unknown job) falls through to the
FastAPI routes in service/routes/jobs.py, which own validation, errors and the OpenAPI
description; both produce byte-identical bodies (tests/integration/test_api_hot_path.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import Connection
from starlette.types import ASGIApp, Receive, Scope, Send

from core import job_reads
from core.db import read_engine
from core.errors import ServiceError
from core.models import JobStatus
from core.settings import Settings, get_settings
from service.deps import ID_PATTERN, in_read
from service.errors import send_error
from service.schemas import JobsPublic, job_public

PATH = re.compile(r"/v1/jobs/(" + ID_PATTERN.strip("^$") + ")")
TEMPLATE = "/v1/jobs/{job_id}"
LIST = "/v1/jobs"
_ID = re.compile(ID_PATTERN)
_CURSOR = re.compile(job_reads.CURSOR_PATTERN)
_DIGITS = re.compile(r"[0-9]{1,10}")
_STATUSES = frozenset(s.value for s in JobStatus)


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

    def _work(
        self, scope: Scope, principal: Any, settings: Settings
    ) -> tuple[Callable[[Connection], Any], str, bool] | None:
        """What to read, the route's template, and whether the read is as short as a
        primary-key lookup (inline on SQLite: service.deps.in_read), for a request served
        here."""
        path = scope.get("path", "")
        if path == LIST:
            args = list_args(scope.get("query_string", b""))
            if args is None:
                return None

            def page(conn: Connection) -> bytes:
                rows, count, cursor = job_reads.job_page(conn, principal, **args)
                data = [job_public(row) for row in rows]
                answer = JobsPublic(data=data, count=count, next_cursor=cursor)
                return answer.model_dump_json(by_alias=True).encode()

            return page, LIST, job_reads.short_page(read_engine(settings), principal, args)
        match = PATH.fullmatch(path)
        if match is None:
            return None
        job_id = match.group(1)

        def job(conn: Connection) -> bytes | None:
            try:
                row = job_reads.owned_job(conn, principal, job_id)
            except ServiceError:
                return None  # the route answers the 404
            return job_public(row).model_dump_json(by_alias=True).encode()

        return job, TEMPLATE, True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = (scope.get("state") or {}).get("principal")
        settings = self._settings()
        if (
            scope["type"] == "http"
            and scope.get("method") == "GET"
            and principal is not None
            and principal.has("read")
            and (found := self._work(scope, principal, settings)) is not None
        ):
            work, template, short = found
            try:
                body = await in_read(settings, work, bounded=short)
            except ServiceError as exc:  # no free database connection: the route's 503
                await send_error(send, exc)
                return
            if body is not None:
                scope["route"] = self.route(template)
                headers = [
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"application/json"),
                ]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

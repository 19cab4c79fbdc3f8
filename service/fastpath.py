"""The job poll, `GET /v1/jobs/{id}`, answered without FastAPI's routing and dependency
resolution: the request clients send all day (BENCHMARKS.md, "API hot path").

Plain ASGI, innermost: the outer middlewares (request id and metrics, body limits, the
Authenticate middleware with its rate limit) have run, so the caller's principal is in the
scope. Only the usual answer is served here: a well-formed id, a key with the `read` scope,
a job of the caller's tenant. Everything else (a malformed id, a missing scope, an unknown
job) falls through to the FastAPI route in service/routes/jobs.py, which
owns validation, errors and the OpenAPI description; the two produce byte-identical bodies
(tests/integration/test_api_hot_path.py).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection
from starlette.types import ASGIApp, Receive, Scope, Send

from core import job_reads
from core.errors import ServiceError
from core.settings import Settings, get_settings
from service.deps import ID_PATTERN, in_read
from service.errors import send_error
from service.schemas import job_public

PATH = re.compile(r"/v1/jobs/(" + ID_PATTERN.strip("^$") + ")")
TEMPLATE = "/v1/jobs/{job_id}"


class FastJobPoll:
    def __init__(self, app: ASGIApp, router_app: Any) -> None:
        self.app = app
        self.router_app = router_app  # the FastAPI app: its settings override and the route
        self._route: Any = None

    def _settings(self) -> Settings:
        # As service.deps._settings: the app's override of get_settings (tests set one).
        overrides = self.router_app.dependency_overrides
        return overrides.get(get_settings, get_settings)()  # type: ignore[no-any-return]

    def route(self) -> Any:
        """The FastAPI route this path stands for (the metrics label it with its template)."""
        if self._route is None:
            from service.observability import flat_routes

            for prefix, route in flat_routes(self.router_app.routes):
                if prefix + getattr(route, "path", "") == TEMPLATE and "GET" in route.methods:
                    self._route = route
        return self._route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "GET":
            match = PATH.fullmatch(scope.get("path", ""))
            principal = (scope.get("state") or {}).get("principal")
            if match is not None and principal is not None and principal.has("read"):
                job_id = match.group(1)

                def work(conn: Connection) -> bytes | None:
                    try:
                        row = job_reads.owned_job(conn, principal, job_id)
                    except ServiceError:
                        return None  # the route answers the 404
                    return job_public(row).model_dump_json(by_alias=True).encode()

                try:
                    body = await in_read(self._settings(), work, bounded=True)
                except ServiceError as exc:  # no free database connection: the route's 503
                    await send_error(send, exc)
                    return
                if body is not None:
                    scope["route"] = self.route()
                    headers = [
                        (b"content-length", str(len(body)).encode()),
                        (b"content-type", b"application/json"),
                    ]
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)

"""Request ids and Prometheus metrics for the API.

`RequestObservability` is the outermost middleware, so it sees every answer, the 401s and
429s of the auth middleware included. It takes the caller's X-Request-ID (or makes one),
sets it in context for the log lines (core/logs.py) and for the tasks the request sends
(core/queue.py), and returns it as X-Request-ID. It counts requests by method, route
template and status and times them by route template: the template (`/v1/jobs/{job_id}`),
never the raw path, so a label has one value per route, not one per job.

GET /metrics (outside /v1, so no tenant auth and no rate limit) answers in Prometheus'
text format; METRICS_ENABLED=false turns it off (404) and METRICS_TOKEN, when set, is the
bearer token it requires. One API process (what `finetune serve` runs) has all of its own
numbers; `serve --workers N` shares them through files (PROMETHEUS_MULTIPROC_DIR, set by
the CLI), so any process answers for all; separate replicas are scraped one by one.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logs
from core.metrics import ServiceCollector
from core.settings import Settings
from service.errors import ErrorCode, ServiceError

REQUESTS = Counter(
    "finetune_http_requests", "HTTP requests answered", ["method", "route", "status"]
)
LATENCY = Histogram(
    "finetune_http_request_duration_seconds",
    "Time to the end of the response, by route template",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_FLIGHT = Gauge(
    "finetune_http_requests_in_flight",
    "HTTP requests being answered",
    multiprocess_mode="livesum",  # `serve --workers N`: the live processes' sum
)

UNMATCHED = "<unmatched>"  # a path no route serves: one label value for all of them


def flat_routes(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(prefix, route) for every route, through the routers FastAPI includes lazily."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from flat_routes(inner.routes, prefix + getattr(context, "prefix", ""))
        else:
            yield prefix, route


def route_template(app: Any, scope: Scope) -> str:
    """The path template of the route that serves `scope` (a mount: its prefix). Routing
    leaves the route in the scope; a request refused before routing (401, 413, 429) is
    matched here against the same routes."""
    routed = scope.get("route")
    if routed is not None and getattr(routed, "path", None):
        return str(routed.path)
    path = scope.get("path", "")
    for prefix, route in flat_routes(getattr(app, "routes", ())):
        if prefix and not path.startswith(prefix):
            continue
        match, _ = route.matches({**scope, "path": path[len(prefix) :]})
        if match is not Match.NONE:  # PARTIAL: the path, another method (a 405)
            return prefix + str(getattr(route, "path", UNMATCHED))
    return UNMATCHED


class RequestObservability:
    def __init__(self, app: ASGIApp, router_app: Any) -> None:
        self.app = app
        self.router_app = router_app  # the FastAPI app, whose routes name the template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id")
        rid = logs.accept_request_id(given.decode("latin-1") if given else None)
        token = logs.request_id.set(rid)
        method = scope.get("method", "GET")
        status = 500  # unless a response starts
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", rid.encode("latin-1")),
                ]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            IN_FLIGHT.dec()
            route = route_template(self.router_app, scope)
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - start)
            logs.request_id.reset(token)


def process_registry(settings: Settings) -> CollectorRegistry:
    """This process's metrics; with several API processes, all of theirs added up."""
    if settings.prometheus_multiproc_dir is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(settings.prometheus_multiproc_dir))
    return registry


def metrics_router(settings: Settings) -> APIRouter:
    """GET /metrics: this process's request metrics, then jobs by status and queue depth."""
    router = APIRouter()
    service = CollectorRegistry(auto_describe=False)
    service.register(ServiceCollector(settings))

    @router.get("/metrics", include_in_schema=False)
    def read_metrics(request: Request) -> Response:
        if not settings.metrics_enabled:
            raise ServiceError(ErrorCode.NOT_FOUND, "metrics are off (METRICS_ENABLED=false)")
        if settings.metrics_token:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {settings.metrics_token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise ServiceError(
                    ErrorCode.UNAUTHENTICATED,
                    "/metrics needs 'Authorization: Bearer <METRICS_TOKEN>'",
                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        body = generate_latest(process_registry(settings)) + generate_latest(service)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router

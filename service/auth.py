"""Authentication and rate limiting, in front of every `/v1/` route.

A pure ASGI middleware, so a request without a valid key is refused before its body is
read (an anonymous upload is never spooled to disk). The principal it resolves is put in
the request state; the routes' dependencies (service/deps.py) check scopes and ownership.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import sqlalchemy.exc
from starlette.types import ASGIApp, Receive, Scope, Send

from core.db import session_scope
from core.settings import Settings
from core.tenancy import (
    ANONYMOUS,
    AuthFailure,
    Limits,
    Principal,
    resolve_token,
    storage_overrun,
    tenant_limits,
)
from service.errors import POOL_EXHAUSTED, ErrorCode, ServiceError, send_error

MULTIPART_SLACK = 64 * 1024


class RateLimiter:
    """A token bucket per tenant: `per_minute` requests a minute, bursts up to that many.
    Per API process (with N API replicas a tenant gets N times the rate)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str, per_minute: int) -> float:
        """0 if the request may go on, else the seconds until it could."""
        now = time.monotonic()
        rate = per_minute / 60.0
        with self._lock:
            tokens, at = self._buckets.get(key, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate


class Authenticate:
    OPEN_PATHS = ("/healthz", "/readyz")

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.limiter = RateLimiter()

    def _resolve(
        self, authorization: str | None, upload_bytes: int | None
    ) -> tuple[Principal, Limits, str | None]:
        """(principal, its tenant's limits, why an announced upload cannot fit its storage)."""
        with session_scope(self.settings) as session:
            principal = (
                resolve_token(session, authorization)[0]
                if self.settings.auth_enabled
                else ANONYMOUS
            )
            limits = tenant_limits(session, principal.tenant_id, self.settings)
            # Content-Length includes the multipart framing: allow for it here; the route
            # checks the exact file size once it is read.
            over = (
                storage_overrun(
                    session,
                    principal.tenant_id,
                    limits.max_storage_bytes,
                    upload_bytes,
                    MULTIPART_SLACK,
                )
                if upload_bytes is not None
                else None
            )
            return principal, limits, over

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not path.startswith("/v1/")
            or scope.get("method") == "OPTIONS"  # CORS preflight carries no credentials
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"authorization")
        authorization = raw.decode("latin-1") if raw is not None else None
        # An upload that cannot fit the tenant's storage is refused before it is read.
        length = headers.get(b"content-length", b"")
        upload_bytes = (
            int(length)
            if scope.get("method") == "POST" and path == "/v1/datasets" and length.isdigit()
            else None
        )
        try:
            principal, limits, over = await anyio.to_thread.run_sync(
                self._resolve, authorization, upload_bytes
            )
        except sqlalchemy.exc.TimeoutError:
            await send_error(send, POOL_EXHAUSTED)
            return
        except AuthFailure as exc:
            await send_error(
                send,
                ServiceError(
                    ErrorCode.UNAUTHENTICATED,
                    exc.reason,
                    headers={"WWW-Authenticate": 'Bearer realm="finetune"'},
                ),
            )
            return
        per_minute = limits.rate_limit_per_minute
        wait = self.limiter.take(principal.tenant_id, per_minute)
        if wait > 0:
            await send_error(
                send,
                ServiceError(
                    ErrorCode.RATE_LIMITED,
                    f"too many requests: this tenant may make {per_minute} a minute; retry in "
                    f"{wait:.1f}s",
                    headers={"Retry-After": str(max(1, int(wait + 0.999)))},
                ),
            )
            return
        if over is not None:
            await send_error(send, ServiceError(ErrorCode.STORAGE_LIMIT, over))
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        state["principal"] = principal
        state["limits"] = limits  # the routes enforce the others without reading them again
        await self.app(scope, receive, send)

"""Authentication and rate limiting, in front of every `/v1/` route.

A pure ASGI middleware, so a request without a valid key is refused before its body is
read (an anonymous upload is never spooled to disk). The principal it resolves is put in
the request state; the routes' dependencies (service/deps.py) check scopes and ownership.

The hot path: a key verified in the last AUTH_CACHE_SECONDS is answered from this process's
`KeyCache` (no thread, no query); a new one costs one query, the key joined to its tenant's
limits. The rate limit is `service/ratelimit.py` (Redis-shared when there is Redis).
"""

from __future__ import annotations

import hashlib
import time
import weakref
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
    authenticate,
    parse_token,
    storage_overrun,
    tenant_limits,
)
from service.errors import POOL_EXHAUSTED, ErrorCode, ServiceError, send_error
from service.ratelimit import RateLimiter, storage_url

MULTIPART_SLACK = 64 * 1024


class KeyCache:
    """Verified keys for `ttl` seconds (AUTH_CACHE_SECONDS): the token's SHA-256 -> its
    principal and tenant limits. A hit costs no database round trip and no thread; a key
    revoked (or a limit changed) by another process takes effect within `ttl`, by this
    process's admin routes at once (`Authenticate` clears every cache after them). Failures
    are never cached: a bad key is looked up every time."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Principal, Limits]] = {}
        _CACHES.add(self)

    def get(self, digest: str) -> tuple[Principal, Limits] | None:
        hit = self._entries.get(digest)
        if hit is None or hit[0] <= time.monotonic():
            return None
        return hit[1], hit[2]

    def put(self, digest: str, principal: Principal, limits: Limits) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()  # simple bound: they are all refilled within one TTL
        self._entries[digest] = (time.monotonic() + self.ttl, principal, limits)

    def clear(self) -> None:
        self._entries.clear()


_CACHES: weakref.WeakSet[KeyCache] = weakref.WeakSet()


def forget_keys() -> None:
    """Drop every verified key of this process (after a revocation or a limit change)."""
    for cache in list(_CACHES):
        cache.clear()


class Authenticate:
    OPEN_PATHS = ("/healthz", "/readyz")

    # Requests after which this process's cached keys may be stale: the admin routes that
    # revoke keys, disable tenants or change their limits.
    ADMIN_PREFIX = "/v1/admin/"

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.limiter = RateLimiter(storage_url(settings))
        self.keys = KeyCache(settings.auth_cache_seconds)

    def _resolve(self, authorization: str | None) -> tuple[Principal, Limits]:
        """The caller and its tenant's limits: one query (key joined to tenant)."""
        with session_scope(self.settings) as session:
            if self.settings.auth_enabled:
                return authenticate(session, authorization, self.settings)
            return ANONYMOUS, tenant_limits(session, ANONYMOUS.tenant_id, self.settings)

    def _overrun(self, tenant_id: str, limit: int, upload_bytes: int) -> str | None:
        """Why an announced upload cannot fit the tenant's storage. Content-Length includes
        the multipart framing: allow for it here; the route checks the exact file size."""
        with session_scope(self.settings) as session:
            return storage_overrun(session, tenant_id, limit, upload_bytes, MULTIPART_SLACK)

    async def _principal(self, authorization: str | None) -> tuple[Principal, Limits]:
        if self.settings.auth_enabled:
            _, token = parse_token(authorization)  # a malformed header needs no lookup
            digest = hashlib.sha256(token.encode()).hexdigest()
        else:
            digest = "anonymous"
        hit = self.keys.get(digest)
        if hit is not None:
            return hit
        principal, limits = await anyio.to_thread.run_sync(self._resolve, authorization)
        self.keys.put(digest, principal, limits)
        return principal, limits

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
            principal, limits = await self._principal(authorization)
            over = (
                await anyio.to_thread.run_sync(
                    self._overrun, principal.tenant_id, limits.max_storage_bytes, upload_bytes
                )
                if upload_bytes is not None
                else None
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
        wait = await self.limiter.take(principal.tenant_id, per_minute)
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
        if scope.get("method") == "GET" or not path.startswith(self.ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            forget_keys()  # a key revoked or a limit changed here counts from the next request

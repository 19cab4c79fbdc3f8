"""Per-tenant caps on heavy requests, and the threads heavy work runs on.

Sync routes, sync dependencies and the auth middleware's key lookup all run on one shared
pool of threads (anyio's default limiter, 40 threads). Work that holds a thread for seconds
must not run there: a few uploads would leave nothing for /healthz, /v1/me and the status
polls of every other tenant. So:

- an upload or import takes one of its tenant's TENANT_MAX_CONCURRENT_UPLOADS slots before
  its body is read (`UploadSlots`; 429 RATE_LIMITED with Retry-After when none is free),
  and its ingest runs on INGEST_THREADS threads of its own (`ingest_limiter`);
- a preview is rendered by a worker, and a tenant may have at most
  TENANT_MAX_RENDERING_PREVIEWS of them rendering at once (`RenderSlots`); the preview
  route's own work (a few object store reads, tens of milliseconds on S3) runs on
  TENANT_PREVIEW_THREADS threads per tenant, PREVIEW_THREADS in all (`TenantThreads`), so
  that a burst of them waits its turn without holding a thread, and other tenants'
  requests go first.

Each of these threads may hold a database connection: `database_threads` is how many
connections the API may want at once, which the pool (DB_POOL_SIZE + DB_MAX_OVERFLOW)
should cover.

The counts are per API process, like the rate limiter: N API replicas allow N times as many.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ErrorCode, ServiceError, send_error

# An ingest takes seconds to minutes; asking again much sooner is wasted.
UPLOAD_RETRY_AFTER_SECONDS = 10


# Threads one tenant's preview requests may use at once, and all tenants' together.
TENANT_PREVIEW_THREADS = 4
PREVIEW_THREADS = 8
# The same for predictions: each holds decoded images and an onnxruntime run (and, for a
# request with several images, one decoding helper: service/routes/predict.py).
TENANT_PREDICT_THREADS = 4
PREDICT_THREADS = 8


def database_threads(ingest_threads: int) -> int:
    """The most threads of the API that may hold a database connection at once: anyio's
    shared pool (sync routes and dependencies, the key lookup), ingest, previews, and the
    reaper, predictions (each only for its ownership check)."""
    shared = int(anyio.to_thread.current_default_thread_limiter().total_tokens)
    return shared + ingest_threads + PREVIEW_THREADS + PREDICT_THREADS + 1


def ingest_limiter(threads: int) -> anyio.CapacityLimiter:
    """The threads uploads and imports decode on; waiting for one holds no other thread."""
    return anyio.CapacityLimiter(threads)


class UploadSlots:
    """ASGI middleware, inside `Authenticate` (it needs the tenant): at most `per_tenant`
    uploads and imports of a tenant at once, the rest refused before their body is read."""

    PATHS = ("/v1/datasets", "/v1/datasets/import")

    def __init__(self, app: ASGIApp, per_tenant: int) -> None:
        self.app = app
        self.per_tenant = per_tenant
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def _take(self, tenant: str) -> bool:
        with self._lock:
            if self._running.get(tenant, 0) >= self.per_tenant:
                return False
            self._running[tenant] = self._running.get(tenant, 0) + 1
            return True

    def _give_back(self, tenant: str) -> None:
        with self._lock:
            left = self._running.get(tenant, 1) - 1
            if left > 0:
                self._running[tenant] = left
            else:
                self._running.pop(tenant, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get("state", {}).get("principal")
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in self.PATHS
            or principal is None
        ):
            await self.app(scope, receive, send)
            return
        tenant = principal.tenant_id
        if not self._take(tenant):
            exc = ServiceError(
                ErrorCode.RATE_LIMITED,
                f"this tenant already has {self.per_tenant} uploads or imports in progress "
                "(TENANT_MAX_CONCURRENT_UPLOADS); retry when one has finished",
                headers={"Retry-After": str(UPLOAD_RETRY_AFTER_SECONDS)},
            )
            # The body stays unread: close the connection rather than drain it.
            await send_error(send, exc, ((b"connection", b"close"),))
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._give_back(tenant)


class TenantThreads:
    """Threads for one kind of work: at most `per_tenant` for each tenant and `total` in
    all; what waits for one holds no thread. Enter `of(tenant)`, then run on `total`."""

    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant = per_tenant
        self.total = anyio.CapacityLimiter(total)
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._lock = threading.Lock()

    def of(self, tenant: str) -> anyio.CapacityLimiter:
        with self._lock:
            if tenant not in self._limiters:
                self._limiters[tenant] = anyio.CapacityLimiter(self.per_tenant)
            return self._limiters[tenant]


class RenderSlots:
    """The previews each tenant has rendering: preview key -> (when it was counted, whether
    its task is sent, i.e. its `.pending` marker written).

    A preview stops counting when a request finds it rendered or failed (`done`), when its
    marker is gone from the store (`release_finished`: the worker finished it, or it was
    evicted), or when it is older than `lost_after` (its task was lost, and the next
    request for it sends it again). One not sent yet has no marker to look for: it counts
    until its sender says how it went (`sent` or `done`)."""

    # How often a tenant's markers may be looked for: a burst of refused requests makes
    # one round of store reads, not one each.
    CHECK_INTERVAL_SECONDS = 1.0

    def __init__(self, lost_after: float) -> None:
        self.lost_after = lost_after
        self._counted: dict[str, dict[str, tuple[float, bool]]] = {}
        self._checked_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def take(self, tenant: str, key: str, per_tenant: int) -> bool:
        """Count `key` as rendering for `tenant`, unless `per_tenant` others already are."""
        now = time.time()
        with self._lock:
            counted = self._counted.setdefault(tenant, {})
            for old in [k for k, (at, _) in counted.items() if now - at > self.lost_after]:
                del counted[old]
            if key not in counted and len(counted) >= per_tenant:
                return False
            counted[key] = (now, False)
            return True

    def sent(self, tenant: str, key: str) -> None:
        with self._lock:
            counted = self._counted.get(tenant, {})
            if key in counted:
                counted[key] = (counted[key][0], True)

    def done(self, tenant: str, key: str) -> None:
        with self._lock:
            self._counted.get(tenant, {}).pop(key, None)

    def release_finished(self, tenant: str, still_pending: Callable[[str], bool]) -> None:
        """Stop counting the tenant's sent previews whose marker is gone (one store read
        each, outside the lock; at most once a CHECK_INTERVAL_SECONDS per tenant)."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at.get(tenant, -1e9) < self.CHECK_INTERVAL_SECONDS:
                return
            self._checked_at[tenant] = now
            keys = [k for k, (_, sent) in self._counted.get(tenant, {}).items() if sent]
        for key in keys:
            if not still_pending(key):
                self.done(tenant, key)

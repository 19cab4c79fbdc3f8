"""The per-tenant request rate limit, shared by every API process that counts in one Redis.

`limits`' sliding-window counter: O(1) per tenant in memory and in Redis (a moving window
would keep one entry per request, a million for a generous limit), and no burst of twice
the limit at a window's edge as a fixed window allows. On Redis (RATE_LIMIT_STORAGE_URL,
else a redis:// BROKER_URL) N API processes together allow the tenant's limit, not N times
it; on the embedded default each process counts in its own memory.

On Redis a process takes its tenant's requests in small batches (`batch_size`: 1% of the
per-minute limit, at most 50, 1 for a limit under 200) with one round trip, and spends them
locally for at most BATCH_SECONDS: the Redis round trip was half of a job poll's cost
(BENCHMARKS.md, "API hot path"). The processes together still never allow more than the
limit; what a process took and did not spend in time is lost, so the limit a tenant gets
is at worst (batch - 1) requests per process lower. Near the limit, a batch that no longer
fits is asked for one request at a time (for BATCH_SECONDS), so the last requests of the
window are usable and a refused request costs one round trip, as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from core.settings import Settings

log = logging.getLogger("finetune.ratelimit")

KEY_PREFIX = "finetune-rate"
# How long a broken Redis is not asked again (the API answers meanwhile, unlimited).
OUTAGE_BACKOFF_SECONDS = 5.0
# How long a process may spend requests it took from Redis in advance.
BATCH_SECONDS = 1.0
MAX_BATCH = 50


def storage_url(settings: Settings) -> str:
    """Where the counters live: RATE_LIMIT_STORAGE_URL, else the broker's Redis, else memory."""
    if settings.rate_limit_storage_url:
        return settings.rate_limit_storage_url
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    return "memory://"


def _storage(url: str) -> Storage:
    if url.startswith("memory://"):
        return MemoryStorage()
    if url.startswith(("redis://", "rediss://")):
        # limits' asyncio Redis storage, on redis-py's asyncio client (a dependency already).
        return RedisStorage(f"async+{url}", implementation="redispy", key_prefix=KEY_PREFIX)
    raise ValueError(f"RATE_LIMIT_STORAGE_URL={url!r}: expected redis://, rediss:// or memory://")


def batch_size(per_minute: int) -> int:
    """Requests taken from Redis at once: 1% of the limit, between 1 and MAX_BATCH."""
    return max(1, min(MAX_BATCH, per_minute // 100))


@dataclass
class _Batch:
    left: int  # requests taken from the store and not yet spent
    until: float  # time.monotonic() after which they are dropped
    single: bool = False  # a batch no longer fitted: ask one at a time until `until`


class RateLimiter:
    """`per_minute` requests per tenant in any minute (sliding-window estimate)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.shared = not url.startswith("memory://")
        self._limiter = SlidingWindowCounterRateLimiter(_storage(url))
        self._down_until = 0.0
        self._batches: dict[tuple[str, int], _Batch] = {}

    async def take(self, tenant_id: str, per_minute: int) -> float:
        """0 if the request may go on, else the seconds until it could. A Redis that does
        not answer lets requests through (logged): an outage of the limiter's store must
        not take the API down with it."""
        now = time.monotonic()
        if self._down_until > now:
            return 0.0
        key = (tenant_id, per_minute)
        batch = self._batches.get(key)
        if batch is not None and batch.left > 0 and batch.until > now:
            batch.left -= 1
            return 0.0
        item = RateLimitItemPerMinute(per_minute)
        near = batch is not None and batch.single and batch.until > now
        size = batch_size(per_minute) if self.shared and not near else 1
        try:
            if size > 1:
                if await self._limiter.hit(item, tenant_id, cost=size):
                    self._keep(key, size - 1, now)
                    return 0.0
                self._keep(key, 0, now, single=True)
            if await self._limiter.hit(item, tenant_id):
                return 0.0
            stats = await self._limiter.get_window_stats(item, tenant_id)
        except Exception as exc:  # noqa: BLE001 - any storage failure: fail open, loudly
            log.warning("rate limiter storage %s failed (%s): not limiting for now", self.url, exc)
            self._down_until = time.monotonic() + OUTAGE_BACKOFF_SECONDS
            return 0.0
        return max(0.1, stats.reset_time - time.time())

    def _keep(self, key: tuple[str, int], left: int, now: float, single: bool = False) -> None:
        """Keep a batch's unspent requests (added to what another coroutine of this process
        took meanwhile). Expired batches are dropped as the dict grows: one entry per tenant
        active in the last second, not per tenant ever seen."""
        batch = self._batches.get(key)
        if batch is not None and batch.until > now:
            batch.left += left
            batch.single = batch.single or single
            return
        if len(self._batches) >= 1024:
            self._batches = {k: b for k, b in self._batches.items() if b.until > now}
        self._batches[key] = _Batch(left, now + BATCH_SECONDS, single)

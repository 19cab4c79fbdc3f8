"""The per-tenant request rate limit, shared by every API process that counts in one Redis.

`limits`' sliding-window counter: O(1) per tenant in memory and in Redis (a moving window
would keep one entry per request, a million for a generous limit), and no burst of twice
the limit at a window's edge as a fixed window allows. On Redis (RATE_LIMIT_STORAGE_URL,
else a redis:// BROKER_URL) N API processes together allow the tenant's limit, not N times
it; on the embedded default each process counts in its own memory.
"""

from __future__ import annotations

import logging
import time

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from core.settings import Settings

log = logging.getLogger("finetune.ratelimit")

KEY_PREFIX = "finetune-rate"
# How long a broken Redis is not asked again (the API answers meanwhile, unlimited).
OUTAGE_BACKOFF_SECONDS = 5.0


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


class RateLimiter:
    """`per_minute` requests per tenant in any minute (sliding-window estimate)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.shared = not url.startswith("memory://")
        self._limiter = SlidingWindowCounterRateLimiter(_storage(url))
        self._down_until = 0.0

    async def take(self, tenant_id: str, per_minute: int) -> float:
        """0 if the request may go on, else the seconds until it could. A Redis that does
        not answer lets requests through (logged): an outage of the limiter's store must
        not take the API down with it."""
        if self._down_until > time.monotonic():
            return 0.0
        item = RateLimitItemPerMinute(per_minute)
        try:
            if await self._limiter.hit(item, tenant_id):
                return 0.0
            stats = await self._limiter.get_window_stats(item, tenant_id)
        except Exception as exc:  # noqa: BLE001 - any storage failure: fail open, loudly
            log.warning("rate limiter storage %s failed (%s): not limiting for now", self.url, exc)
            self._down_until = time.monotonic() + OUTAGE_BACKOFF_SECONDS
            return 0.0
        return max(0.1, stats.reset_time - time.time())

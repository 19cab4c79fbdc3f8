"""The per-tenant request rate limit, shared by every API process that counts in one Redis.

`limits`' sliding-window counter: O(1) per tenant in memory and in Redis (a moving window
would keep one entry per request, a million for a generous limit), and no burst of twice
the limit at a window's edge as a fixed window allows. On Redis (RATE_LIMIT_STORAGE_URL,
else a redis:// BROKER_URL) N API processes together allow the tenant's limit, not N times
it; on the embedded default each process counts in its own memory.

On Redis a process takes a tenant's requests in batches with one round trip and spends them
locally for at most BATCH_SECONDS: the Redis round trip was half of a job poll's cost
(BENCHMARKS.md, "API hot path"). A batch is sized to the process's demand (`_Batch.
next_size`: from 1, doubling while batches are spent before they expire, cut to what was
spent when one expires), at most 1% of the per-minute limit and MAX_BATCH, and 1 for a
limit under 200. The processes together still never allow more than the limit; what a
process took and did not spend in time is dropped (counted, not used), a fraction of its
own recent demand. Near the limit, a batch that no longer fits is asked for one request at
a time for BATCH_SECONDS, so the last requests of the window are usable and a refused
request costs one round trip. One fetch per tenant is in flight per process: concurrent
requests that find the batch empty wait for it instead of each taking a batch.
"""

from __future__ import annotations

import asyncio
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
    """The most requests taken from Redis at once: 1% of the limit, between 1 and MAX_BATCH."""
    return max(1, min(MAX_BATCH, per_minute // 100))


@dataclass
class _Batch:
    """A process's requests of one tenant taken from the store in advance."""

    left: int = 0  # taken and not yet spent
    until: float = 0.0  # time.monotonic() after which they are dropped
    taken: int = 0  # the size of the last batch taken
    single_until: float = 0.0  # a batch no longer fitted: one at a time until then
    # The fetch in flight, which the other requests that find the batch empty wait for (a
    # future of the running loop, never a lock: a limiter outlives a test's event loop).
    fetching: asyncio.Future[None] | None = None

    def next_size(self, now: float, most: int) -> int:
        """Sized to this process's demand: twice the last batch when it was spent before it
        expired, what was spent of it when it expired (so what is dropped unspent each
        second stays a fraction of what the process actually uses), 1 to start."""
        if self.single_until > now or self.taken == 0:
            return 1
        spent = self.taken - self.left
        if self.left == 0 and self.until > now:
            return min(most, 2 * self.taken)
        return max(1, min(most, spent))


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
        if self._down_until > time.monotonic():
            return 0.0
        most = batch_size(per_minute) if self.shared else 1
        if most == 1:  # every request asks the store, as without batches
            return await self._ask(tenant_id, per_minute, None)
        key = (tenant_id, per_minute)
        batch = self._batches.get(key)
        if batch is None:
            self._prune()
            batch = self._batches[key] = _Batch()
        if batch.left > 0 and batch.until > time.monotonic():
            batch.left -= 1
            return 0.0
        loop = asyncio.get_running_loop()
        while (fetch := batch.fetching) is not None and fetch.get_loop() is loop:
            await asyncio.shield(fetch)  # one fetch per tenant in flight in this process
            if batch.left > 0 and batch.until > time.monotonic():
                batch.left -= 1
                return 0.0
        batch.fetching = fetch = loop.create_future()
        try:
            size = batch.next_size(time.monotonic(), most)
            return await self._ask(tenant_id, per_minute, batch, size)
        finally:
            batch.fetching = None
            fetch.set_result(None)

    async def _ask(
        self, tenant_id: str, per_minute: int, batch: _Batch | None, size: int = 1
    ) -> float:
        item = RateLimitItemPerMinute(per_minute)
        now = time.monotonic()
        try:
            if size > 1:
                if await self._limiter.hit(item, tenant_id, cost=size):
                    self._refill(batch, size, now)
                    return 0.0
                if batch is not None:
                    batch.single_until = now + BATCH_SECONDS
            if await self._limiter.hit(item, tenant_id):
                self._refill(batch, 1, now)
                return 0.0
            stats = await self._limiter.get_window_stats(item, tenant_id)
        except Exception as exc:  # noqa: BLE001 - any storage failure: fail open, loudly
            log.warning("rate limiter storage %s failed (%s): not limiting for now", self.url, exc)
            self._down_until = time.monotonic() + OUTAGE_BACKOFF_SECONDS
            return 0.0
        return max(0.1, stats.reset_time - time.time())

    @staticmethod
    def _refill(batch: _Batch | None, size: int, now: float) -> None:
        """`size` requests taken: one for this request, the rest kept (what was left of
        the previous batch had expired or was spent)."""
        if batch is not None:
            batch.taken, batch.left, batch.until = size, size - 1, now + BATCH_SECONDS

    def _prune(self) -> None:
        """One entry per tenant active in the last few seconds, not per tenant ever seen."""
        if len(self._batches) > 1024:
            now = time.monotonic()
            self._batches = {
                k: b
                for k, b in self._batches.items()
                if b.until + BATCH_SECONDS > now or b.fetching is not None
            }

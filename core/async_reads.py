"""PostgreSQL's polled reads (the job poll, the job list) on psycopg's async pool: without
the hop to a thread and back (BENCHMARKS.md, "API hot path").

`service/fastpath.py` awaits these on the event loop, only while the app's lifespan runs
(it closes them: `close_all`). One pool per event loop (psycopg's async pool belongs to the
loop that opened it; a test client runs each app in a loop of its own), opened on first
use. Connections are in autocommit (one round trip a statement), and psycopg prepares a
statement it has run five times on a connection. Any error here is not an answer: the
caller falls back to the thread-pool path, whose SQLAlchemy errors and 503s are the API's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine, make_url

from core import job_reads
from core.settings import Settings
from core.tenancy import Principal

T = TypeVar("T")
# A request waits this long for a pooled connection on the event loop, then reads on a
# thread: a saturated pool costs it a second, not DB_POOL_TIMEOUT_SECONDS twice.
WAIT_SECONDS = 1.0
_pools: dict[tuple[str, int], AsyncConnectionPool] = {}


def conninfo(url: str) -> str:
    """libpq's URL for SQLAlchemy's `postgresql+psycopg://...`."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _pool(settings: Settings) -> AsyncConnectionPool:
    """This loop's pool for the settings' database: DB_POOL_SIZE connections at most."""
    url = settings.resolved_database_url
    key = (url, id(asyncio.get_running_loop()))
    found = _pools.get(key)
    if found is None:
        found = AsyncConnectionPool(
            conninfo(url),
            min_size=1,
            max_size=settings.db_pool_size,
            timeout=settings.db_pool_timeout_seconds,
            kwargs={"autocommit": True},
            open=False,
        )
        _pools[key] = found
        await found.open()
    return found


async def _read(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """`work(connection)` on a pooled connection. A connection the server dropped while it
    was idle in the pool fails its statement, and the pool discards it on return: the
    read is tried once more, on another. Waits at most WAIT_SECONDS for a connection
    (`PoolTimeout`: the caller reads on a thread, which waits DB_POOL_TIMEOUT_SECONDS)."""
    pool = await _pool(settings)
    for attempt in (1, 2):
        try:
            async with pool.connection(timeout=WAIT_SECONDS) as conn:
                return await work(conn)
        except psycopg.OperationalError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def owned_job(
    settings: Settings, engine: Engine, principal: Principal, job_id: str
) -> Any | None:
    """The caller's job as a row (core.job_reads.owned_job), None when it has none."""
    params = {"job_id": job_id, "tenant_id": principal.tenant_id}
    rows = await _read(
        settings, lambda conn: job_reads.BY_ID.rows_async(conn, engine.dialect, params)
    )
    return rows[0] if rows else None


async def job_page(
    settings: Settings, engine: Engine, principal: Principal, args: dict[str, Any]
) -> tuple[list[Any], int, str | None]:
    """core.job_reads.job_page, awaited."""
    read = job_reads.plan_page(engine, principal, **args)

    async def both(conn: Any) -> tuple[int, list[Any]]:
        count = read.cached
        if count is None:
            got = await read.count_query.rows_async(conn, engine.dialect, read.params)
            count = job_reads.counted(read, got[0][0] if got else 0)
        return count, await read.query.rows_async(conn, engine.dialect, read.params)

    count, fetched = await _read(settings, both)
    rows, cursor = job_reads.page_of(read, fetched)
    return rows, count, cursor


async def close_all() -> None:
    """Close this loop's pools (the app's shutdown)."""
    loop = id(asyncio.get_running_loop())
    for key in [k for k in _pools if k[1] == loop]:
        await _pools.pop(key).close()

"""The reads every client polls, in SQLAlchemy Core on the autocommit read engine
(`core.db.read_engine`): one statement, one round trip, plain rows. An ORM session costs
about four times as much per request (identity map, BEGIN, ROLLBACK on release), and these
routes are what the API serves all day (BENCHMARKS.md, "API hot path").

A row has the job's columns as attributes, so `service.schemas.job_public` reads it as it
reads a `Job`. Deep pages: `offset` works (the list indexes of migration 0014 make it cheap),
and `after`, the cursor each page returns as `next_cursor`, reads the next page by
keyset (created_at, id) without counting rows it skips.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import Connection, Integer, and_, bindparam, func, or_, select

from core.db import as_utc
from core.errors import ErrorCode, ServiceError
from core.lean_select import LeanSelect
from core.models import Job
from core.tenancy import Principal

JOBS = Job.__table__
# What `job_public` (and the predict route) read: not the worker's bookkeeping, nor the
# error's traceback (kilobytes a failed job, on every page it is on).
_UNREAD = ("worker_id", "resent_at", "run_seconds", "error_traceback", "cancel_mode", "tenant_id")
_COLUMNS = [c for c in JOBS.c if c.name not in _UNREAD]


# Built once: a statement's construction and cache key cost more than its execution.
BY_ID = LeanSelect(
    select(*_COLUMNS).where(
        JOBS.c.id == bindparam("job_id"), JOBS.c.tenant_id == bindparam("tenant_id")
    )
)
_COUNT = select(func.count()).select_from(JOBS)


# From this offset on, a page first finds its ids in the list's index, then reads those
# rows ("deferred join"): skipping 3,000 jobs then reads none of them from the table
# (PostgreSQL: 1.27 -> 0.94 ms; SQLite 0.29 -> 0.24 ms); at offset 0 it costs more.
DEEP_OFFSET = 500


@lru_cache(maxsize=16)
def _page_query(
    by_status: bool, by_dataset: bool, after: bool, deep: bool = False
) -> tuple[LeanSelect, LeanSelect]:
    """(the count, the page) for one combination of filters, with bound parameters."""
    where = [JOBS.c.tenant_id == bindparam("tenant_id")]
    if by_status:
        where.append(JOBS.c.status == bindparam("status"))
    if by_dataset:
        where.append(JOBS.c.dataset_id == bindparam("dataset_id"))
    if after:
        when = bindparam("after_when", type_=JOBS.c.created_at.type)
        last = bindparam("after_id", type_=JOBS.c.id.type)
        where.append(
            or_(JOBS.c.created_at < when, and_(JOBS.c.created_at == when, JOBS.c.id > last))
        )
    newest = (JOBS.c.created_at.desc(), JOBS.c.id)
    window = (bindparam("offset", type_=Integer), bindparam("limit", type_=Integer))
    if deep:
        ids = select(JOBS.c.id).where(*where).order_by(*newest).offset(window[0]).limit(window[1])
        page = select(*_COLUMNS).where(JOBS.c.id.in_(ids.scalar_subquery())).order_by(*newest)
    else:
        page = select(*_COLUMNS).where(*where).order_by(*newest).offset(window[0]).limit(window[1])
    return LeanSelect(_COUNT.where(*where[: 1 + by_status + by_dataset])), LeanSelect(page)


def owned_job(conn: Connection, principal: Principal, job_id: str) -> Any:
    """The caller's job as a row; another tenant's answers exactly like a missing one."""
    row = BY_ID.first(conn, {"job_id": job_id, "tenant_id": principal.tenant_id})
    if row is None:
        raise ServiceError(ErrorCode.JOB_NOT_FOUND, f"job {job_id!r} not found")
    return row


# `<microseconds since 1970 UTC>~<job id>`: the (created_at, id) of a page's last job. Every
# string of this shape is a position in the list, so the API can promise a 200 for it.
CURSOR_PATTERN = r"^[0-9]{1,17}~[A-Za-z0-9_.-]{1,100}$"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def encode_cursor(row: Any) -> str:
    micros = (as_utc(row.created_at) - _EPOCH) // timedelta(microseconds=1)  # type: ignore[operator]
    return f"{micros}~{row.id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    micros, sep, job_id = cursor.partition("~")
    if not (sep and micros.isdigit() and len(micros) <= 17 and job_id):
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            f"after={cursor[:60]!r} is not a cursor this API issued: pass the `next_cursor` "
            "of the previous page, or leave `after` out for the first page",
        )
    return _EPOCH + timedelta(microseconds=int(micros)), job_id


# A large count is reused for up to COUNT_CACHE_SECONDS within one API process: counting a
# tenant's 10,000 jobs took 0.3 ms on SQLite (1 ms on PostgreSQL), more than the rest of the
# list's page. Below COUNT_CACHED_FROM matching jobs counting is cheap and always exact.
COUNT_CACHE_SECONDS = 2.0
COUNT_CACHED_FROM = 1000
_counts: dict[tuple[Any, ...], tuple[float, int]] = {}  # (when counted, the count)
_forgotten: dict[str, int] = {}  # per tenant: how many times `forget_counts` ran


class PageRead(NamedTuple):
    """One page's reads: the count (unless `cached` has it) and the page, their parameters."""

    count_query: LeanSelect
    query: LeanSelect
    params: dict[str, Any]
    key: tuple[Any, ...]  # the count's, in _counts
    cached: int | None
    limit: int
    generation: int  # the tenant's in _forgotten when planned


def plan_page(
    engine: Any,
    principal: Principal,
    *,
    status: str | None,
    dataset_id: str | None,
    limit: int,
    offset: int,
    after: str | None,
) -> PageRead:
    """What to read for one page of the caller's jobs (`job_page`, or awaited on the event
    loop: core/async_reads.py), on the read engine `engine`."""
    params: dict[str, Any] = {
        "tenant_id": principal.tenant_id,
        "status": status,
        "dataset_id": dataset_id,
        "offset": offset,
        "limit": limit + 1,
    }
    count_query, query = _page_query(
        status is not None, dataset_id is not None, after is not None, offset >= DEEP_OFFSET
    )
    if after is not None:
        when, params["after_id"] = decode_cursor(after)
        if engine.dialect.name == "sqlite":  # stored without a zone, in UTC
            when = when.replace(tzinfo=None)
        params["after_when"] = when
    key = (engine, principal.tenant_id, status, dataset_id)
    hit = _counts.get(key)
    fresh = hit is not None and time.monotonic() - hit[0] < COUNT_CACHE_SECONDS
    cached = hit[1] if hit is not None and fresh and hit[1] >= COUNT_CACHED_FROM else None
    generation = _forgotten.get(principal.tenant_id, 0)
    return PageRead(count_query, query, params, key, cached, limit, generation)


def counted(read: PageRead, count: Any) -> int:
    """The count just read, remembered for COUNT_CACHE_SECONDS; unless the tenant's counts
    were forgotten meanwhile (it may predate that submit or cancel)."""
    if len(_counts) >= 10_000:  # bounded: many tenants' counts, each read again within 2 s
        _counts.clear()
    if _forgotten.get(read.key[1], 0) == read.generation:
        _counts[read.key] = (time.monotonic(), int(count or 0))
    return int(count or 0)


def page_of(read: PageRead, rows: list[Any]) -> tuple[list[Any], str | None]:
    """The page's rows (one more was read) and the cursor of the next page, if any."""
    more = len(rows) > read.limit
    rows = rows[: read.limit]
    return rows, (encode_cursor(rows[-1]) if more and rows else None)


# A short page: at most SHORT_PAGE_ROWS rows to skip and read (about 0.3 ms on SQLite), at
# most SHORT_PAGE_LIMIT jobs to build, and a count known to be cached or small (a small
# count SMALL_COUNT_SECONDS old at most: a tenant's jobs do not grow a hundredfold sooner).
SHORT_PAGE_ROWS = 5000
SHORT_PAGE_LIMIT = 100
SMALL_COUNT_SECONDS = 60.0


def short_page(engine: Any, principal: Principal, args: dict[str, Any]) -> bool:
    """Whether reading this page costs about as little as a primary-key lookup."""
    if (
        args["offset"] + args["limit"] > SHORT_PAGE_ROWS
        or args["limit"] > SHORT_PAGE_LIMIT
        or args["after"] is not None
    ):
        return False
    hit = _counts.get((engine, principal.tenant_id, args["status"], args["dataset_id"]))
    if hit is None:
        return False
    age = time.monotonic() - hit[0]
    return age < COUNT_CACHE_SECONDS or (hit[1] < COUNT_CACHED_FROM and age < SMALL_COUNT_SECONDS)


def forget_counts(tenant_id: str) -> None:
    """The tenant submitted or canceled a job through this process: count afresh."""
    _forgotten[tenant_id] = _forgotten.get(tenant_id, 0) + 1
    for key in [k for k in list(_counts) if k[1] == tenant_id]:  # list(): other threads add
        _counts.pop(key, None)


def job_page(
    conn: Connection, principal: Principal, **args: Any
) -> tuple[Sequence[Any], int, str | None]:
    """One page of the caller's jobs, newest first (ties by id), the count of all that
    match, and the cursor of the page after this one (None on the last page). `args`:
    status, dataset_id, limit, offset, after (`plan_page`)."""
    read = plan_page(conn.engine, principal, **args)
    count = read.cached
    if count is None:
        count = counted(read, read.count_query.scalar(conn, read.params))
    rows, cursor = page_of(read, read.query.rows(conn, read.params))
    return rows, count, cursor

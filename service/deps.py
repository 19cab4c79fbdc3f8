"""Dependencies shared by the routers, as typed aliases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Annotated, Any, TypeVar

import anyio
from anyio import CapacityLimiter
from fastapi import Depends, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Connection, func, select
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from core.db import read_engine, session_factory
from core.settings import Settings, get_settings
from core.storage import ObjectStore, get_store
from core.tenancy import Limits, Principal
from service.concurrency import RenderSlots, TenantThreads
from service.errors import ErrorCode, ServiceError


async def _settings(request: Request) -> Settings:
    """get_settings (or the app's override of it, as tests set) without a thread: FastAPI
    runs a sync dependency on the shared thread pool, one more hop on every request."""
    return request.app.dependency_overrides.get(get_settings, get_settings)()  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(_settings)]


# How soon to ask again when every database connection was busy (DB_POOL_TIMEOUT_SECONDS).
DB_BUSY_RETRY_AFTER_SECONDS = 5


def _pool_exhausted(exc: PoolTimeout) -> ServiceError:
    return ServiceError(
        ErrorCode.STORAGE_UNAVAILABLE,
        "the database has no free connection right now (DB_POOL_TIMEOUT_SECONDS); "
        "try again shortly",
        headers={"Retry-After": str(DB_BUSY_RETRY_AFTER_SECONDS)},
    )


def _session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request, on the database of the settings in force. A request that
    waited DB_POOL_TIMEOUT_SECONDS for a connection answers 503 with Retry-After: the
    database is overloaded, not the request wrong. (The route's exceptions are raised here,
    at the yield.)"""
    session = session_factory(settings)()
    try:
        yield session
    except PoolTimeout as exc:
        raise _pool_exhausted(exc) from exc
    finally:
        session.close()


T = TypeVar("T")


async def in_session(settings: Settings, work: Callable[[Session], T]) -> T:
    """`work(session)` on one thread of the pool, the session opened and closed there: the
    hot read routes' one thread hop (SessionDep costs three: open, route, close)."""

    def run() -> T:
        with session_factory(settings)() as session:
            try:
                return work(session)
            except PoolTimeout as exc:
                raise _pool_exhausted(exc) from exc

    return await anyio.to_thread.run_sync(run)


async def in_read(settings: Settings, work: Callable[[Connection], T], bounded: bool = False) -> T:
    """`work(connection)` on the autocommit read engine (one round trip a statement,
    SQLAlchemy Core rows, no ORM session): the polled routes' reads. On one thread of the
    pool; except, on SQLite, a `bounded` read (one primary-key lookup, or a short page whose
    count is known: core.job_reads.short_page): in WAL mode a reader never waits for a
    writer, and such a read costs less than the hop to a thread and back."""

    def run() -> T:
        try:
            with read_engine(settings).connect() as conn:
                return work(conn)
        except PoolTimeout as exc:
            raise _pool_exhausted(exc) from exc

    engine = read_engine(settings)
    # Inline only with a connection idle in the pool: opening one, or waiting for one
    # (DB_POOL_TIMEOUT_SECONDS), must never stall the event loop and every other request.
    if bounded and engine.dialect.name == "sqlite" and engine.pool.checkedin() > 0:  # type: ignore[attr-defined]
        return run()
    return await anyio.to_thread.run_sync(run)


SessionDep = Annotated[Session, Depends(_session)]


# The dependencies below do no I/O, so they are `async def`: a sync one would wait for a
# thread of the shared pool, which is exactly what is scarce under load.
async def _store(settings: SettingsDep) -> ObjectStore:
    return get_store(settings)  # built once per process, then a dict lookup


StoreDep = Annotated[ObjectStore, Depends(_store)]


async def _ingest_limiter(request: Request) -> CapacityLimiter:
    return request.app.state.ingest_limiter  # type: ignore[no-any-return]


async def _render_slots(request: Request) -> RenderSlots:
    return request.app.state.render_slots  # type: ignore[no-any-return]


async def _preview_threads(request: Request) -> TenantThreads:
    return request.app.state.preview_threads  # type: ignore[no-any-return]


# The INGEST_THREADS threads that uploads and imports decode on (service/concurrency.py).
IngestLimiterDep = Annotated[CapacityLimiter, Depends(_ingest_limiter)]
# The previews each tenant has rendering (service/concurrency.py).
RenderSlotsDep = Annotated[RenderSlots, Depends(_render_slots)]
# The threads each tenant's preview requests run on (service/concurrency.py).
PreviewThreadsDep = Annotated[TenantThreads, Depends(_preview_threads)]


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer ft_...` (`finetune keys create`).",
)


async def _principal(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """Set by the Authenticate middleware for every /v1/ request."""
    principal = getattr(request.state, "principal", None)
    if principal is None:  # only if a route were mounted outside /v1/
        raise ServiceError(ErrorCode.UNAUTHENTICATED, "missing API key")
    return principal  # type: ignore[no-any-return]


def require(*scopes: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency passing a principal that holds at least one of `scopes`."""

    async def check(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        if not any(principal.has(s) for s in scopes):
            raise ServiceError(
                ErrorCode.INSUFFICIENT_SCOPE,
                f"this API key lacks the {' or '.join(map(repr, scopes))} scope (it has: "
                f"{', '.join(sorted(principal.scopes))})",
            )
        return principal

    return check


async def _limits(request: Request, _: Annotated[Principal, Depends(_principal)]) -> Limits:
    """The caller's tenant limits, read once per request by the Authenticate middleware."""
    return request.state.limits  # type: ignore[no-any-return]


LimitsDep = Annotated[Limits, Depends(_limits)]
ReadDep = Annotated[Principal, Depends(require("read"))]
WriteDep = Annotated[Principal, Depends(require("write"))]
# What an admin may do within its own tenant, an operator may do for any (core/admin.py).
AdminDep = Annotated[Principal, Depends(require("admin", "operator"))]
OperatorDep = Annotated[Principal, Depends(require("operator"))]


# Object ids and tenant names in paths and queries: anything else (a NUL byte, a slash, a
# 10 kB string) is a 422 before it reaches the database.
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,100}$"
PathId = Annotated[str, Path(pattern=ID_PATTERN, max_length=100)]
QueryId = Annotated[str | None, Query(pattern=ID_PATTERN, max_length=100)]


Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]


def page(
    session: Session,
    model: type[Any],
    where: list[Any],
    order_by: tuple[Any, ...],
    limit: int,
    offset: int,
) -> tuple[Sequence[Any], int]:
    """One page of `model` rows matching every condition in `where`, and the total count."""
    rows = session.scalars(
        select(model).where(*where).order_by(*order_by).limit(limit).offset(offset)
    ).all()
    count = session.scalar(select(func.count()).select_from(model).where(*where)) or 0
    return rows, count


def client_of(request: Request) -> str | None:
    return request.client.host if request.client else None

"""Engine, sessions and schema migration. The same code serves SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings, get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


class PoolSize(NamedTuple):
    """Connections kept open, extra ones opened under load, and how long a session waits for
    one before `sqlalchemy.exc.TimeoutError` (which the API answers as a 503)."""

    size: int
    overflow: int
    timeout: float

    @classmethod
    def of(cls, settings: Settings) -> PoolSize:
        return cls(
            settings.db_pool_size, settings.db_max_overflow, settings.db_pool_timeout_seconds
        )


# A pooled connection idle longer than this is pinged before it is handed out (a server may
# have dropped it); one in use moments ago is not: a ping on every checkout was one more
# round trip on every API request. A connection the server dropped meanwhile fails that one
# statement, and SQLAlchemy then discards the whole pool (a disconnect error invalidates it).
PING_AFTER_IDLE_SECONDS = 10.0


def _ping_after_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            cur = dbapi_conn.cursor()
            cur.execute("SELECT 1")
            cur.close()
            if not dbapi_conn.autocommit:
                dbapi_conn.rollback()
        except Exception as exc:  # the pool retries with a fresh connection
            raise DisconnectionError(f"pooled connection dropped: {exc}") from exc


@lru_cache(maxsize=8)
def get_engine(url: str, pool: PoolSize, autocommit: bool = False) -> Engine:
    kwargs: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    path = url.split("///", 1)[1] if "///" in url else ""
    # An in-memory SQLite database lives in its one connection: no pool to size.
    if not (url.startswith("sqlite") and path in ("", ":memory:")):
        kwargs.update(pool_size=pool.size, max_overflow=pool.overflow, pool_timeout=pool.timeout)
    if url.startswith("sqlite"):
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # The API and the worker process write the same file: wait rather than fail.
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
    if not url.startswith("sqlite"):  # a SQLite file has no server to go away
        _ping_after_idle(engine)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


@lru_cache(maxsize=8)
def _session_factory(url: str, pool: PoolSize) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url, pool), expire_on_commit=False)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    settings = settings or get_settings()
    return _session_factory(settings.resolved_database_url, PoolSize.of(settings))


@lru_cache(maxsize=8)
def _read_engine(url: str, pool: PoolSize) -> Engine:
    if url.startswith("sqlite") and url.split("///", 1)[-1] not in ("", ":memory:"):
        # A pool of its own, opened in autocommit: switching a shared connection's isolation
        # on checkout and back on return runs PRAGMAs, 80 us of a 130-us read. (A SQLite
        # file has no connection limit to share; PostgreSQL's switch is free, see below.)
        return get_engine(url, pool, autocommit=True)
    return get_engine(url, pool).execution_options(isolation_level="AUTOCOMMIT")


def read_engine(settings: Settings | None = None) -> Engine:
    """The engine for single-statement reads (the API's polled routes): in autocommit (the
    same pool on PostgreSQL, one of its own on a SQLite file), so a read is one round trip:
    no BEGIN, and no ROLLBACK when the connection goes back to the pool. Never for writes
    or for reads that must agree with each other."""
    global _read_last
    settings = settings or get_settings()
    last = _read_last
    if last is not None and last[0] is settings:  # the API's one Settings: no URL to build
        return last[1]
    engine = _read_engine(settings.resolved_database_url, PoolSize.of(settings))
    _read_last = (settings, engine)
    return engine


_read_last: tuple[Settings, Engine] | None = None


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(database_url: str) -> Any:
    from alembic.config import Config

    # The migrations ship as the `migrations` package, so this works from a source checkout
    # and from a plain `pip install .` alike; alembic.ini (logging) only in a checkout.
    import migrations

    ini = REPO_ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.is_file() else Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def migrate(settings: Settings | None = None) -> None:
    """`alembic upgrade head` for the configured database."""
    from alembic import command

    settings = settings or get_settings()
    url = settings.resolved_database_url
    get_engine(url, PoolSize.of(settings))  # creates the SQLite file's folder on a fresh machine
    command.upgrade(alembic_config(url), "head")

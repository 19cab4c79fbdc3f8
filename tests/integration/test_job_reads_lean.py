"""The polled reads' lean path (core/lean_select.py, core/job_reads.py) and the job list's
fast path (service/fastpath.py), issue 15: the same rows as SQLAlchemy's `execute` on
SQLite and PostgreSQL, SQLAlchemy's errors when the driver fails, a large count reused for
COUNT_CACHE_SECONDS and a small one always exact, and list answers byte-identical to the
FastAPI route's."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from psycopg_pool import PoolTimeout
from sqlalchemy import column, create_engine, select, table
from sqlalchemy.exc import DBAPIError

from core import job_reads
from core.db import read_engine, session_scope, utcnow
from core.lean_select import LeanSelect
from core.models import ApiKey, Base, Dataset, Job, new_id
from core.settings import Settings
from tests.integration.test_api_hot_path import api, bearer, new_key


@pytest.fixture(scope="module")
def env(integration_env) -> dict[str, str]:
    return {**integration_env, "AUTH_ENABLED": "true", "RATE_LIMIT_PER_MINUTE": "100000"}


class Caller:
    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id


def varied_jobs(tenant_id: str, dataset_id: str) -> list[Job]:
    """Jobs that use every kind of column: NULLs, JSON, booleans, dates, errors."""
    now = utcnow()
    return [
        Job(id=new_id("job"), tenant_id=tenant_id, dataset_id=dataset_id, status="queued",
            config={"epochs": 2}, created_at=now - timedelta(seconds=3)),
        Job(id=new_id("job"), tenant_id=tenant_id, dataset_id=dataset_id, status="failed",
            config={"epochs": 3, "lr": 0.01}, created_at=now - timedelta(seconds=2),
            started_at=now - timedelta(seconds=1), finished_at=now, attempts=2,
            error_code="TRAINING_FAILED", error_message="boom", epoch=1, total_epochs=3,
            latest_metrics={"val_accuracy": 0.5}, best_metrics={"val_accuracy": 0.5}),
        Job(id=new_id("job"), tenant_id=tenant_id, dataset_id=dataset_id, status="canceled",
            config={}, created_at=now - timedelta(seconds=1), cancel_requested=True,
            cancel_mode="stop-and-keep", eta_seconds=1.5, step=3, total_steps=9,
            phase="fine_tune", progress_at=now, checkpoint_key="ck/1",
            result={"bundle_key": "b/1", "warnings": ["cut short"]}),
    ]  # fmt: skip


def seed(engine_or_session, tenant_id: str = "t1") -> str:
    """A dataset and its three varied jobs; the dataset's id."""
    ds = Dataset(id=new_id("ds"), tenant_id=tenant_id, name="d", archive_key="a",
                 index_key="i", size_bytes=1, sha256="0" * 64, num_images=2,
                 classes=["a", "b"], class_counts={}, report={})  # fmt: skip
    engine_or_session.add(ds)
    engine_or_session.flush()
    engine_or_session.add_all(varied_jobs(tenant_id, ds.id))
    return ds.id


def same_rows(conn, ds_id: str, tenant_id: str) -> None:
    caller = Caller(tenant_id)
    params = {"tenant_id": tenant_id, "status": None, "dataset_id": ds_id, "offset": 0,
              "limit": 10}  # fmt: skip
    for flags in [(False, False, False), (True, False, False), (False, True, False)]:
        count_query, page = job_reads._page_query(*flags)
        for status in ("failed", "canceled"):
            params["status"] = status
            lean = page.rows(conn, params)
            plain = conn.execute(page.statement, params).all()
            assert [tuple(r) for r in lean] == [tuple(r) for r in plain] and plain
            assert (
                count_query.scalar(conn, params)
                == conn.execute(count_query.statement, params).scalar()
            )
    # A deep page (ids from the index first, then their rows) is the same page.
    params.update(status=None, dataset_id=ds_id)
    for offset in (0, 1, 2, 3):
        params["offset"] = offset
        for by_dataset in (False, True):
            shallow = job_reads._page_query(False, by_dataset, False)[1].rows(conn, params)
            deep = job_reads._page_query(False, by_dataset, False, True)[1].rows(conn, params)
            assert [tuple(r) for r in deep] == [tuple(r) for r in shallow], offset
    for row in conn.execute(select(Job.id).where(Job.dataset_id == ds_id)):
        lean = job_reads.owned_job(conn, caller, row.id)
        plain = conn.execute(
            job_reads.BY_ID.statement, {"job_id": row.id, "tenant_id": tenant_id}
        ).one()
        assert tuple(lean) == tuple(plain)
        assert lean.created_at == plain.created_at and lean.config == plain.config


def test_lean_rows_equal_sqlalchemy_rows_on_sqlite(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path / 'lean.db'}")
    Base.metadata.create_all(engine)
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        ds_id = seed(s)
        s.commit()
    with engine.connect() as conn:
        same_rows(conn, ds_id, "t1")
        # A driver error is SQLAlchemy's error, as `execute` raises it.
        with pytest.raises(DBAPIError, match="no_such_table"):
            LeanSelect(select(table("no_such_table", column("x")).c.x)).rows(conn, {})


def test_lean_rows_equal_sqlalchemy_rows_on_postgresql(env):
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    key_id, _ = new_key("lean")
    with session_scope() as s:
        tenant_id = s.get(ApiKey, key_id).tenant_id
        ds_id = seed(s, tenant_id)
    with read_engine(settings).connect() as conn:
        assert conn.dialect.name == "postgresql"
        same_rows(conn, ds_id, tenant_id)
        with pytest.raises(DBAPIError, match="no_such_table"):
            LeanSelect(select(table("no_such_table", column("x")).c.x)).rows(conn, {})


def test_a_large_count_is_reused_briefly_and_a_small_one_is_always_exact(env, monkeypatch):
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    monkeypatch.setattr(job_reads, "COUNT_CACHED_FROM", 3)
    monkeypatch.setattr(job_reads, "COUNT_CACHE_SECONDS", 60.0)
    key_id, _ = new_key("counts")
    with session_scope() as s:
        tenant_id = s.get(ApiKey, key_id).tenant_id
        ds_id = seed(s, tenant_id)  # three jobs
    caller = Caller(tenant_id)
    engine = read_engine(settings)
    args = {"status": None, "dataset_id": None, "limit": 2, "offset": 0, "after": None}

    def count(**overrides) -> int:
        with engine.connect() as conn:
            return job_reads.job_page(conn, caller, **{**args, **overrides})[1]

    def add_job(status: str) -> None:
        with session_scope() as s:
            s.add(Job(id=new_id("job"), tenant_id=tenant_id, dataset_id=ds_id, status=status,
                      config={}))  # fmt: skip

    assert not job_reads.short_page(engine, caller, args)  # never counted: not known short
    assert count() == 3
    assert job_reads.short_page(engine, caller, args)
    assert not job_reads.short_page(engine, caller, {**args, "offset": 10_000})
    assert not job_reads.short_page(engine, caller, {**args, "after": "1~job_x"})
    add_job("failed")
    assert count() == 3  # reused: at or above COUNT_CACHED_FROM
    assert count(status="failed") == 2  # below it: exact on every read
    add_job("failed")
    assert count(status="failed") == 3
    job_reads.forget_counts(tenant_id)  # what a submit or cancel through this process does
    assert count() == 5
    monkeypatch.setattr(job_reads, "COUNT_CACHE_SECONDS", 0.0)
    add_job("queued")
    assert count() == 6  # expired
    assert not job_reads.short_page(engine, caller, args)  # expired and large: not short


def test_the_list_fast_path_answers_exactly_as_the_route_and_leaves_the_rest_to_it(
    env, monkeypatch
):
    from service import fastpath
    from service.observability import REQUESTS
    from service.routes import jobs as job_routes

    key_id, token = new_key("fastlist")
    with session_scope() as s:
        tenant_id = s.get(ApiKey, key_id).tenant_id
        ds_id = seed(s, tenant_id)
        other_id = seed(s, tenant_id)
    with api(env) as client:
        page = client.get("/v1/jobs", params={"limit": 2}, headers=bearer(token)).json()
        first = page["next_cursor"]
        queries = [
            {}, {"limit": 2}, {"limit": 2, "offset": 3}, {"status": "failed"},
            {"dataset_id": ds_id, "limit": 1}, {"after": first, "limit": 2},
            {"status": "canceled", "dataset_id": other_id}, {"unknown": "x"},
        ]  # fmt: skip
        served = REQUESTS.labels("GET", "/v1/jobs", "200")
        for query in queries:
            with monkeypatch.context() as m:
                m.setattr(job_routes, "in_read", lambda *a, **k: pytest.fail("route served"))
                before = served._value.get()
                fast = client.get("/v1/jobs", params=query, headers=bearer(token))
                assert served._value.get() == before + 1, query  # the route's template
            with monkeypatch.context() as m:
                m.setattr(fastpath, "LIST", "/not-served-here")
                slow = client.get("/v1/jobs", params=query, headers=bearer(token))
            assert fast.status_code == slow.status_code == 200, query
            assert fast.content == slow.content, query
            assert fast.headers["content-type"] == slow.headers["content-type"]
        assert client.get("/v1/jobs", headers=bearer(token)).json()["count"] == 6
        # What the fast path does not serve, the route answers: its 422s name the parameter.
        for bad, name in [("limit=0", "limit"), ("limit=abc", "limit"), ("status=nope", "status"),
                          ("offset=-1", "offset"), ("after=zz", "after"),
                          ("dataset_id=a%20b", "dataset_id")]:  # fmt: skip
            answer = client.get(f"/v1/jobs?{bad}", headers=bearer(token))
            assert answer.status_code == 422 and name in answer.json()["detail"], bad
        twice = client.get("/v1/jobs?limit=1&limit=2", headers=bearer(token))
        assert twice.status_code == 200  # the route's reading of a repeated parameter
        assert client.get("/v1/jobs", headers=bearer("ft_wrong")).status_code == 401
    assert re.fullmatch(r"[0-9]+~job_[A-Za-z0-9]+", first or "")


def test_on_postgresql_polls_and_pages_are_read_on_the_event_loop_with_threads_as_fallback(
    env, monkeypatch
):
    """core/async_reads.py answers (no thread read at all); when it fails, the thread path
    answers the same bytes and the loop path rests for LOOP_OFF_SECONDS."""
    from core import async_reads
    from service import fastpath

    key_id, token = new_key("onloop")
    with session_scope() as s:
        tenant_id = s.get(ApiKey, key_id).tenant_id
        seed(s, tenant_id)
    with session_scope() as s:
        job_id = s.scalars(select(Job.id).where(Job.tenant_id == tenant_id).limit(1)).one()
    paths = [f"/v1/jobs/{job_id}", "/v1/jobs?limit=2", "/v1/jobs?status=failed"]
    with api(env) as client:
        with monkeypatch.context() as m:
            m.setattr(fastpath, "in_read", lambda *a, **k: pytest.fail("read on a thread"))
            on_loop = [client.get(p, headers=bearer(token)) for p in paths]
        assert [r.status_code for r in on_loop] == [200, 200, 200]
        missing = client.get("/v1/jobs/job_nope", headers=bearer(token))
        assert missing.status_code == 404  # the loop found none: the route's answer

        async def broken(*args, **kwargs):
            raise OSError("connection refused")

        async def saturated(*args, **kwargs):
            raise PoolTimeout("every connection busy")

        middleware = client.app.middleware_stack  # the built stack: find our handler
        while not isinstance(middleware, fastpath.FastJobPoll):
            middleware = middleware.app
        for failure, rests in ((saturated, False), (broken, True)):
            with monkeypatch.context() as m:
                m.setattr(async_reads, "owned_job", failure)
                m.setattr(async_reads, "job_page", failure)
                for path, expected in zip(paths, on_loop, strict=True):
                    middleware._loop_off_until = 0.0  # each request tries the loop first
                    fallen = client.get(path, headers=bearer(token))
                    assert fallen.content == expected.content, path  # read on a thread
                    # A failure rests the loop path for LOOP_OFF_SECONDS; a busy pool not.
                    assert (middleware._loop_off_until > 0) is rests, (failure, path)
        middleware._loop_off_until = 0.0


def test_a_count_read_before_a_submit_is_not_cached_after_it(env, monkeypatch):
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    monkeypatch.setattr(job_reads, "COUNT_CACHED_FROM", 1)
    engine = read_engine(settings)
    caller = Caller("t-race")
    args = {"status": None, "dataset_id": None, "limit": 2, "offset": 0, "after": None}
    read = job_reads.plan_page(engine, caller, **args)  # a list in flight...
    job_reads.forget_counts("t-race")  # ...while a submit through this process lands
    job_reads.counted(read, 5)  # the old count arrives
    assert job_reads.plan_page(engine, caller, **args).cached is None  # not reused
    job_reads.counted(job_reads.plan_page(engine, caller, **args), 6)
    assert job_reads.plan_page(engine, caller, **args).cached == 6


def test_the_list_fast_path_on_sqlite_answers_as_the_route_inline_for_short_pages(
    tmp_path, monkeypatch
):
    """The embedded default: SQLite, no auth. A short page is read on the event loop, a
    long one on a thread; both as the route writes them."""
    from fastapi.testclient import TestClient

    from core.db import migrate
    from core.models import DEFAULT_TENANT
    from service import deps, fastpath
    from service.main import create_app

    settings = Settings(data_dir=str(tmp_path), database_url="", broker_url="",
                        auth_enabled=False)  # fmt: skip
    migrate(settings)
    with session_scope(settings) as s:
        seed(s, DEFAULT_TENANT)
    app = create_app(settings)
    from core.settings import get_settings

    app.dependency_overrides[get_settings] = lambda: settings
    inline: list[bool] = []
    original = deps.anyio.to_thread.run_sync

    async def counting(*args, **kwargs):
        inline.append(False)
        return await original(*args, **kwargs)

    with TestClient(app) as client:
        for query in ({"limit": 2}, {"limit": 2}, {"limit": 200}, {"status": "failed"}):
            with monkeypatch.context() as m:
                m.setattr(deps.anyio.to_thread, "run_sync", counting)
                inline.clear()
                fast = client.get("/v1/jobs", params=query)
            with monkeypatch.context() as m:
                m.setattr(fastpath, "LIST", "/not-served-here")
                slow = client.get("/v1/jobs", params=query)
            assert fast.status_code == slow.status_code == 200, query
            assert fast.content == slow.content, query
            assert len(fast.json()["data"]) >= 1
        # The last short page (its count known from the first) was read without a thread;
        # a 200-job page never is.
        with monkeypatch.context() as m:
            m.setattr(deps.anyio.to_thread, "run_sync", counting)
            inline.clear()
            client.get("/v1/jobs", params={"limit": 2})
            assert inline == []
            client.get("/v1/jobs", params={"limit": 200})
            assert inline == [False]

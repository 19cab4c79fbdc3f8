"""The API's hot path (issue 15): the per-process cache of verified keys honours a revocation
made elsewhere within AUTH_CACHE_SECONDS, and the rate limit is one limit for every API
process that shares Redis (two `finetune serve --no-worker`, one of them with --workers 2)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from core.db import session_scope
from core.models import DEFAULT_TENANT, Tenant
from core.tenancy import create_key, create_tenant, revoke_key
from service.ratelimit import RateLimiter
from tests.conftest import REPO, free_port, wait_for


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def env(integration_env) -> dict[str, str]:
    return {**integration_env, "AUTH_ENABLED": "true", "RATE_LIMIT_PER_MINUTE": "100000"}


def new_key(name: str, **limits: int) -> tuple[str, str]:
    """(key id, token) of a key of a new tenant, made out of band (as the CLI does)."""
    with session_scope() as s:
        tenant = create_tenant(s, f"{name}-{secrets.token_hex(3)}", **limits)
        key, token = create_key(s, tenant, ["read", "write", "admin"], name)
    return key.id, token


def api(env: dict[str, str], **overrides: str) -> TestClient:
    from core.settings import Settings, get_settings
    from service.main import create_app

    settings = Settings(**{k.lower(): v for k, v in {**env, **overrides}.items()})
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app)


def test_a_key_revoked_elsewhere_is_refused_within_the_cache_ttl(env):
    ttl = 1.5
    key_id, token = new_key("cache")
    with api(env, AUTH_CACHE_SECONDS=str(ttl)) as client:
        assert client.get("/v1/me", headers=bearer(token)).status_code == 200
        with session_scope() as s:  # what `finetune keys revoke` does, in another process
            revoke_key(s, key_id)
        revoked_at = time.monotonic()
        while True:
            asked = time.monotonic() - revoked_at  # when the request was sent, not answered
            resp = client.get("/v1/me", headers=bearer(token))
            if resp.status_code == 401:
                break
            # Until the TTL runs out the verified key may still be served from the cache,
            # never after it.
            assert resp.status_code == 200 and asked <= ttl + 0.5, (resp.status_code, asked)
            time.sleep(0.1)
        assert "revoked" in resp.json()["detail"]


def test_a_key_revoked_through_this_api_is_refused_at_once(env):
    with session_scope() as s:
        _, operator = create_key(s, s.get(Tenant, DEFAULT_TENANT), ["read", "operator"], "op")
    key_id, token = new_key("at-once")
    with api(env, AUTH_CACHE_SECONDS="300") as client:
        assert client.get("/v1/me", headers=bearer(token)).status_code == 200
        resp = client.delete(f"/v1/admin/keys/{key_id}", headers=bearer(operator))
        assert resp.status_code == 204
        assert client.get("/v1/me", headers=bearer(token)).status_code == 401


def test_a_bad_key_is_never_cached(env):
    _, token = new_key("bad")
    with api(env, AUTH_CACHE_SECONDS="300") as client:
        wrong = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
        for _ in range(2):
            assert client.get("/v1/me", headers=bearer(wrong)).status_code == 401
        assert client.get("/v1/me", headers=bearer(token)).status_code == 200


def test_the_memory_limiter_counts_per_tenant():
    async def run() -> tuple[list[float], float]:
        limiter = RateLimiter("memory://")
        waits = [await limiter.take("tenant-a", 5) for _ in range(6)]
        return waits, await limiter.take("tenant-b", 5)

    waits, other = asyncio.run(run())
    assert waits[:5] == [0.0] * 5 and 0 < waits[5] <= 60
    assert other == 0.0


def _counted(limiters: list[RateLimiter]) -> list[int]:
    """Count each limiter's round trips to the store (`hit` calls)."""
    trips = [0]
    for limiter in limiters:
        hit = limiter._limiter.hit

        async def counted(*args, _hit=hit, **kwargs):
            trips[0] += 1
            return await _hit(*args, **kwargs)

        limiter._limiter.hit = counted  # type: ignore[method-assign]
    return trips


def test_processes_take_redis_requests_in_batches_and_never_exceed_the_limit():
    """Three limiters on one Redis (three API processes), 1,000 a minute: batches grow to
    10 a round trip, and together they allow at most the limit; a small limit stays exact."""
    from tests.conftest import REDIS_URL

    async def run(per_minute: int) -> tuple[int, int, int]:
        limiters = [RateLimiter(REDIS_URL) for _ in range(3)]
        trips = _counted(limiters)
        tenant = f"batch-{secrets.token_hex(4)}"
        waits = [await limiters[i % 3].take(tenant, per_minute) for i in range(per_minute + 60)]
        allowed = sum(w == 0.0 for w in waits)
        return allowed, trips[0], next(i for i, w in enumerate(waits) if w > 0)

    allowed, trips, first_refused = asyncio.run(run(1000))
    assert 1000 - 3 * 9 <= allowed <= 1000
    assert first_refused >= 1000 - 3 * 9  # no refusal before the limit is (nearly) reached
    assert trips < 200  # about 100 batches, then one ask a request (the last ones, the 429s)
    allowed, trips, _ = asyncio.run(run(12))
    assert allowed == 12 and trips == 12 + 60


def test_a_slow_tenant_wastes_nothing_and_concurrent_requests_share_one_fetch(monkeypatch):
    """Batches follow demand: a process seeing one request a second takes one at a time,
    so a later burst still gets the whole limit; 100 requests arriving at once wait for
    one fetch each round instead of each taking a batch."""
    import service.ratelimit as ratelimit
    from tests.conftest import REDIS_URL

    clock = [1000.0]
    fake = type("T", (), {"monotonic": lambda: clock[0], "time": time.time})
    monkeypatch.setattr(ratelimit, "time", fake)

    async def slow_then_burst() -> tuple[int, int]:
        limiters = [RateLimiter(REDIS_URL) for _ in range(2)]
        tenant = f"slow-{secrets.token_hex(4)}"
        for _ in range(60):  # a minute of one request a second in each process
            for limiter in limiters:
                assert await limiter.take(tenant, 5000) == 0.0
            clock[0] += 1.01
        burst = [await limiters[i % 2].take(tenant, 5000) for i in range(1000)]
        stats = await limiters[0]._limiter.get_window_stats(
            ratelimit.RateLimitItemPerMinute(5000), tenant
        )
        return sum(w == 0.0 for w in burst), stats.remaining

    allowed, remaining = asyncio.run(slow_then_burst())
    assert allowed == 1000
    assert remaining >= 5000 - 120 - 1000 - 2 * 50  # at most a batch a process unspent

    async def concurrent() -> tuple[int, int, int]:
        limiter = RateLimiter(REDIS_URL)
        trips = _counted([limiter])
        tenant = f"burst-{secrets.token_hex(4)}"
        waits = await asyncio.gather(*(limiter.take(tenant, 5000) for _ in range(100)))
        stats = await limiter._limiter.get_window_stats(
            ratelimit.RateLimitItemPerMinute(5000), tenant
        )
        return sum(w == 0.0 for w in waits), trips[0], stats.remaining

    allowed, trips, remaining = asyncio.run(concurrent())
    assert allowed == 100
    assert trips <= 10  # 1, 2, 4, ... 50: a doubling batch per round, not one per request
    assert remaining >= 5000 - 100 - 50


@pytest.fixture(scope="module")
def two_apis(env, tmp_path_factory) -> Iterator[list[str]]:
    """Two API servers on one PostgreSQL and one Redis: the first with two worker processes."""
    logs = tmp_path_factory.mktemp("apis")
    procs, urls = [], []
    for i, extra in enumerate((["--workers", "2"], [])):
        port = free_port()
        cmd = [sys.executable, "-m", "cli", "serve", "--no-worker", "--port", str(port), *extra]
        with open(logs / f"api{i}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    cmd,
                    env={**os.environ, **env},
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        urls.append(f"http://127.0.0.1:{port}")

    def ready(url: str, proc: subprocess.Popen) -> bool:
        assert proc.poll() is None, (logs / "api0.log").read_text()[-2000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        for url, proc in zip(urls, procs, strict=True):
            wait_for(lambda u=url, p=proc: ready(u, p), 90, f"API at {url}")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(45)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_two_api_servers_share_one_rate_limit(two_apis):
    limit = 12
    _, token = new_key("shared", rate_limit_per_minute=limit)
    codes: dict[str, list[int]] = {url: [] for url in two_apis}
    # Fresh connections each time: the --workers 2 server spreads them over its processes.
    for i in range(3 * limit):
        url = two_apis[i % 2]
        resp = httpx.get(f"{url}/v1/me", headers=bearer(token), timeout=10)
        codes[url].append(resp.status_code)
        if resp.status_code == 429:
            assert resp.json()["error_code"] == "RATE_LIMITED"
            assert int(resp.headers["Retry-After"]) >= 1
    allowed = sum(c == 200 for per in codes.values() for c in per)
    # One limit across three processes (a per-process bucket would allow 3 x limit).
    assert allowed == limit, codes
    assert all(429 in per for per in codes.values()), codes
    assert set().union(*codes.values()) <= {200, 429}, codes


def test_keyset_pages_walk_every_job_once_in_the_order_offset_gives(env):
    """`after=<next_cursor>` pages through a tenant's jobs exactly as offset pages do, ties on
    created_at included; a malformed cursor is a 422 naming `after`."""
    from datetime import timedelta

    from core.db import utcnow
    from core.models import ApiKey, Dataset, Job, new_id

    key_id, token = new_key("keyset")
    with session_scope() as s:
        tenant_id = s.get(ApiKey, key_id).tenant_id
        ds = Dataset(
            id=new_id("ds"), tenant_id=tenant_id, name="k", archive_key="a", index_key="i",
            size_bytes=1, sha256="0" * 64, num_images=2, classes=["a", "b"], class_counts={},
            report={},
        )  # fmt: skip
        s.add(ds)
        s.flush()
        now = utcnow()
        for i in range(23):  # three share one created_at: the tie is broken by id
            when = now - timedelta(seconds=i if i not in (5, 6, 7) else 5)
            s.add(Job(id=new_id("job"), tenant_id=tenant_id, dataset_id=ds.id,
                      status="failed", config={}, created_at=when))  # fmt: skip
    with api(env) as client:
        by_offset = [
            j["id"]
            for off in range(0, 23, 5)
            for j in client.get(
                "/v1/jobs", params={"limit": 5, "offset": off}, headers=bearer(token)
            ).json()["data"]
        ]
        walked, cursor, pages = [], None, 0
        while True:
            params = {"limit": 5, **({"after": cursor} if cursor else {})}
            page = client.get("/v1/jobs", params=params, headers=bearer(token)).json()
            assert page["count"] == 23
            walked += [j["id"] for j in page["data"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 5 and len(walked) == 23 == len(set(walked))
        assert walked == by_offset
        bad = client.get("/v1/jobs", params={"after": "not-a-cursor"}, headers=bearer(token))
        assert bad.status_code == 422 and "after" in bad.json()["detail"]
        far = client.get("/v1/jobs", params={"after": "99999999999999999~x"}, headers=bearer(token))
        assert far.status_code == 200 and len(far.json()["data"]) == 23


def test_a_pooled_connection_the_server_dropped_is_replaced_after_idling(env, monkeypatch):
    """No ping on every checkout, but one after PING_AFTER_IDLE_SECONDS: a connection the
    server killed while idle is replaced without failing the request."""
    from core import db
    from core.settings import Settings

    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.2)
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    url = settings.resolved_database_url
    engine = db.create_engine(url, pool_size=1, max_overflow=0)
    db._ping_after_idle(engine)
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with db.get_engine(url, db.PoolSize.of(settings)).connect() as admin:
        admin.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        admin.commit()
    time.sleep(0.3)
    with engine.connect() as conn:  # pinged, found dead, replaced
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
    engine.dispose()


def test_the_poll_fast_path_answers_exactly_as_the_route_and_leaves_the_rest_to_it(
    env, monkeypatch
):
    """`GET /v1/jobs/{id}` is served by service/fastpath.py: the same bytes and headers as the
    FastAPI route, its metrics labelled with the route's template; a 404, a missing scope
    and a malformed id fall through to the route's own answers."""
    from core.models import ApiKey, Dataset, Job, new_id
    from service import fastpath
    from service.observability import REQUESTS
    from service.routes import jobs as job_routes

    key_id, token = new_key("fastpath")
    with session_scope() as s:
        tenant = s.get(Tenant, s.get(ApiKey, key_id).tenant_id)
        _, write_only = create_key(s, tenant, ["write"], "no-read")
        ds = Dataset(
            id=new_id("ds"), tenant_id=tenant.id, name="f", archive_key="a", index_key="i",
            size_bytes=1, sha256="0" * 64, num_images=2, classes=["a", "b"], class_counts={},
            report={},
        )  # fmt: skip
        s.add(ds)
        s.flush()
        job_id = new_id("job")
        s.add(Job(id=job_id, tenant_id=tenant.id, dataset_id=ds.id, status="running",
                  config={"epochs": 3}, epoch=1, total_epochs=3, step=4, total_steps=12,
                  phase="fine_tune", latest_metrics={"val_accuracy": 0.5}))  # fmt: skip
    path = f"/v1/jobs/{job_id}"

    def route_in_read(*args, **kwargs):
        raise AssertionError("the FastAPI route served the poll")

    with api(env) as client:
        with monkeypatch.context() as m:
            m.setattr(job_routes, "in_read", route_in_read)
            served = REQUESTS.labels("GET", "/v1/jobs/{job_id}", "200")
            before = served._value.get()
            fast = client.get(path, headers=bearer(token))
            assert served._value.get() == before + 1  # labelled with the route's template
        with monkeypatch.context() as m:  # the fast path matches nothing: the route answers
            m.setattr(fastpath, "PATH", re.compile(r"(?!)"))
            slow = client.get(path, headers=bearer(token))
        assert fast.status_code == slow.status_code == 200
        assert fast.content == slow.content
        assert fast.json()["progress"]["step"] == 4
        for name in ("content-type", "content-length"):
            assert fast.headers[name] == slow.headers[name]
        assert fast.headers["x-request-id"]
        # What the fast path does not serve, the route answers.
        missing = client.get("/v1/jobs/job_nope", headers=bearer(token))
        assert missing.status_code == 404 and missing.json()["error_code"] == "JOB_NOT_FOUND"
        no_scope = client.get(path, headers=bearer(write_only))
        assert no_scope.status_code == 403 and "read" in no_scope.json()["detail"]
        assert client.get("/v1/jobs/a%20b", headers=bearer(token)).status_code == 422
        assert client.get(path, headers=bearer("ft_wrong")).status_code == 401

"""Heavy requests under load, against a real API process with auth on: one tenant fires 42
preview requests and 8 uploads at once while another tenant polls /healthz and /v1/me.
Previews and uploads are capped per tenant (429 with Retry-After past the cap), the other
tenant is answered fast, nothing answers 500; a dataset keeps a bounded number of previews,
all deleted with it; a request that finds no free database connection answers 503."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from core.db import session_factory, session_scope
from core.settings import Settings, get_settings
from core.tenancy import create_key, create_tenant
from service.deps import SessionDep
from service.errors import install_error_handlers
from tests.conftest import REPO, free_port, wait_for
from tests.helpers import imagefolder_zip, s3_client

pytestmark = pytest.mark.integration

PREVIEWS_PER_TENANT = 4
UPLOADS_PER_TENANT = 2
PREVIEWS_PER_DATASET = 6
PREVIEW = "/v1/datasets/{}/augmentations/preview"
ZIP = imagefolder_zip({"a": 3, "b": 3})


@pytest.fixture(scope="module")
def stack(integration_env, tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real API process, auth on, whose light queue no worker reads: a preview once sent
    stays rendering until the test plays the worker."""
    env = {
        **integration_env,
        "AUTH_ENABLED": "true",
        "TASK_QUEUE": f"load-{secrets.token_hex(4)}",
        "LIGHT_QUEUE": f"load-light-{secrets.token_hex(4)}",
        "TENANT_MAX_RENDERING_PREVIEWS": str(PREVIEWS_PER_TENANT),
        "TENANT_MAX_CONCURRENT_UPLOADS": str(UPLOADS_PER_TENANT),
        "MAX_PREVIEWS_PER_DATASET": str(PREVIEWS_PER_DATASET),
    }
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "api.log"
    cmd = [sys.executable, "-m", "cli", "serve", "--no-worker", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 60, "API ready")
        yield {**env, "URL": url, "LOG": str(log_path)}
    finally:
        proc.terminate()
        proc.wait(20)
        import redis

        redis.Redis.from_url(env["BROKER_URL"]).delete(env["TASK_QUEUE"], env["LIGHT_QUEUE"])


def new_tenant(scopes: list[str]) -> dict[str, str]:
    """Authorization headers for a key of a new tenant of its own."""
    with session_scope() as s:
        tenant = create_tenant(s, f"load-{secrets.token_hex(4)}")
        _, token = create_key(s, tenant, scopes, "load test")
    return {"Authorization": f"Bearer {token}"}


def upload(url: str, headers: dict[str, str]) -> str:
    files = {"file": ("d.zip", ZIP, "application/zip")}
    resp = httpx.post(f"{url}/v1/datasets", files=files, headers=headers, timeout=60)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def slow_upload(url: str, headers: dict[str, str], seconds: float) -> tuple[httpx.Response, float]:
    """An upload whose body trickles in over `seconds`: it holds its slot all that time.
    (A blocking client: asyncio's transports drop a response that comes before the body
    is sent, as a refusal does, when the server then closes the connection.)"""
    request = httpx.Request(
        "POST", f"{url}/v1/datasets", files={"file": ("d.zip", ZIP, "application/zip")}
    )
    body = request.read()
    pieces = 12

    def trickle() -> Iterator[bytes]:
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            yield body[i : i + step]
            time.sleep(seconds / pieces)

    started = time.monotonic()
    resp = httpx.post(
        f"{url}/v1/datasets",
        content=trickle(),
        headers={
            **headers,
            "Content-Type": request.headers["Content-Type"],
            "Content-Length": str(len(body)),
        },
        timeout=60,
    )
    return resp, time.monotonic() - started


async def previews(url: str, headers: dict[str, str], dataset_id: str) -> list[httpx.Response]:
    """42 preview requests with distinct seeds, all at once, from one thread: 42 client
    threads would fight the poller and the S3 server (moto, in this process) for the GIL."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as c:
        return list(
            await asyncio.gather(
                *(
                    c.get(PREVIEW.format(dataset_id), params={"seed": seed, "samples": 2})
                    for seed in range(42)
                )
            )
        )


def test_one_tenants_burst_is_capped_and_other_tenants_are_answered_fast(stack):
    url = stack["URL"]
    busy = new_tenant(["read", "write"])
    calm = new_tenant(["read"])
    dataset_id = upload(url, busy)
    polled: list[tuple[str, int, float]] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                for path, headers in (("/healthz", {}), ("/v1/me", calm)):
                    started = time.monotonic()
                    status = client.get(path, headers=headers).status_code
                    polled.append((path, status, time.monotonic() - started))
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        wait_for(lambda: len(polled) >= 4, 10, "the other tenant's first requests")
        with ThreadPoolExecutor(max_workers=8) as pool:
            uploads = [pool.submit(slow_upload, url, busy, 4.0) for _ in range(8)]
            preview_answers = asyncio.run(previews(url, busy, dataset_id))
            upload_answers = [f.result() for f in uploads]
    finally:
        time.sleep(0.5)  # a few polls after the burst, too
        stop.set()
        poller.join()

    statuses = sorted(r.status_code for r in preview_answers)
    assert statuses == [202] * PREVIEWS_PER_TENANT + [429] * (42 - PREVIEWS_PER_TENANT), [
        r.text for r in preview_answers if r.status_code not in (202, 429)
    ]
    for resp in preview_answers:
        if resp.status_code == 429:
            assert resp.json()["error_code"] == "RATE_LIMITED"
            assert "TENANT_MAX_RENDERING_PREVIEWS" in resp.json()["detail"]
            assert int(resp.headers["Retry-After"]) > 0

    statuses = sorted(r.status_code for r, _ in upload_answers)
    assert statuses == [201] * UPLOADS_PER_TENANT + [429] * (8 - UPLOADS_PER_TENANT), [
        r.text for r, _ in upload_answers
    ]
    for resp, took in upload_answers:
        if resp.status_code == 429:
            assert resp.json()["error_code"] == "RATE_LIMITED"
            assert int(resp.headers["Retry-After"]) > 0
            assert took < 3.0  # refused on its headers, not after its 4 s body
        else:
            assert took >= 4.0

    assert {status for _, status, _ in polled} == {200}, polled
    for path in ("/healthz", "/v1/me"):
        times = [took for p, _, took in polled if p == path]
        assert len(times) >= 10 and max(times) < 1.0, (path, sorted(times)[-5:])


def test_a_dataset_keeps_a_bounded_number_of_previews_all_deleted_with_it(stack):
    url = stack["URL"]
    tenant = new_tenant(["read", "write"])
    dataset_id = upload(url, tenant)
    s3 = s3_client(stack)
    bucket = stack["S3_BUCKET"]
    prefix = f"datasets/{dataset_id}/"

    def objects() -> list[str]:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}previews/")
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def render_pending() -> None:
        """What the light worker would do: store each pending preview, drop its marker."""
        for key in objects():
            if key.endswith(".pending"):
                stem = key.removesuffix(".pending")
                s3.put_object(Bucket=bucket, Key=f"{stem}.png", Body=b"png " + stem.encode())
                s3.delete_object(Bucket=bucket, Key=key)

    def preview(seed: int) -> httpx.Response:
        return httpx.get(
            f"{url}{PREVIEW.format(dataset_id)}", params={"seed": seed}, headers=tenant
        )

    # More previews, one after another, than the tenant may render at once or the
    # dataset may keep: each is rendered, and fetched, before the next is asked for.
    for seed in range(PREVIEWS_PER_DATASET + 3):
        resp = preview(seed)
        assert resp.status_code == 202, resp.text
        render_pending()
        assert preview(seed).status_code == 200
    kept = [k for k in objects() if k.endswith(".png")]
    assert len(kept) == PREVIEWS_PER_DATASET and f"{prefix}previews/index.json" in objects()
    newest = preview(PREVIEWS_PER_DATASET + 2)
    assert newest.status_code == 200 and newest.content.startswith(b"png ")
    assert preview(0).status_code == 202  # evicted: rendered again when asked for

    assert httpx.delete(f"{url}/v1/datasets/{dataset_id}", headers=tenant).status_code == 204
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) == 0


def test_a_request_that_finds_no_free_database_connection_answers_503(tmp_path):
    settings = Settings(
        data_dir=tmp_path, db_pool_size=1, db_max_overflow=0, db_pool_timeout_seconds=0.2
    )
    app = FastAPI()
    install_error_handlers(app)
    app.dependency_overrides[get_settings] = lambda: settings

    @app.get("/probe")
    def probe(session: SessionDep) -> dict[str, int]:
        return {"one": session.execute(text("SELECT 1")).scalar_one()}

    holder = session_factory(settings)()
    holder.execute(text("SELECT 1"))  # holds the pool's only connection
    with TestClient(app) as client:
        busy = client.get("/probe")
        assert busy.status_code == 503, busy.text
        assert busy.json()["error_code"] == "STORAGE_UNAVAILABLE"
        assert int(busy.headers["Retry-After"]) > 0
        holder.close()
        assert client.get("/probe").json() == {"one": 1}

"""Real servers for the integration tests: a fresh PostgreSQL database, Redis, an S3
endpoint (moto's server on loopback) and, where asked, a real Celery worker process."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest processes (pytest-xdist) on a 2-core machine: one torch
    # thread each, and in the worker processes they start, so that no thread waits for a
    # core (a training test of 12 s took 295 s beside another suite's torch processes;
    # measured: 19:42 for the suite this way, 21:07 with two threads that sleep while they
    # wait, OMP_WAIT_POLICY=PASSIVE). Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    import psycopg

    name = f"finetune_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def integration_env(pg_url, s3_endpoint, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The environment the API and the worker share in integration tests."""
    data_dir = tmp_path_factory.mktemp("var")
    env = {
        "DATABASE_URL": pg_url,
        "BROKER_URL": REDIS_URL,
        "TASK_QUEUE": f"test-{secrets.token_hex(4)}",
        "LIGHT_QUEUE": f"test-light-{secrets.token_hex(4)}",
        "STORAGE_BACKEND": "s3",
        "S3_ENDPOINT_URL": s3_endpoint,
        "S3_BUCKET": f"bucket-{secrets.token_hex(4)}",
        "S3_ACCESS_KEY_ID": "testing",
        "S3_SECRET_ACCESS_KEY": "testing",
        "S3_REGION": "us-east-1",
        "DATA_DIR": str(data_dir),
        # Empty caches: only packaged weights count, whatever this machine has cached.
        "TORCH_HOME": str(data_dir / "torch"),
        "HF_HUB_CACHE": str(data_dir / "hf"),
        "PROGRESS_INTERVAL_SECONDS": "0.5",
        "HEARTBEAT_SECONDS": "2",
        # The API-behaviour tests run as the default tenant with auth explicitly off;
        # tests/integration/test_tenancy.py runs everything with keys.
        "AUTH_ENABLED": "false",
        # Jobs other tests leave running or queued on purpose must not trip the default
        # tenant's limits; test_tenancy.py trips each limit on tenants of its own.
        "TENANT_MAX_RUNNING_JOBS": "1000",
        "TENANT_MAX_QUEUED_JOBS": "100000",
        "RATE_LIMIT_PER_MINUTE": "1000000",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    from core.db import migrate
    from core.settings import get_settings

    get_settings.cache_clear()
    migrate(get_settings())
    yield env
    mp.undo()
    get_settings.cache_clear()
    import redis

    redis.Redis.from_url(REDIS_URL).delete(env["TASK_QUEUE"], env["LIGHT_QUEUE"])


@pytest.fixture(scope="session")
def stack_env(integration_env) -> Iterator[dict[str, str]]:
    """integration_env with a queue of its own, for the real server + worker processes
    (so jobs queued by API-only tests are never trained)."""
    import redis

    env = {
        **integration_env,
        "TASK_QUEUE": f"stack-{secrets.token_hex(4)}",
        "LIGHT_QUEUE": f"stack-light-{secrets.token_hex(4)}",
    }
    yield env
    redis.Redis.from_url(REDIS_URL).delete(env["TASK_QUEUE"], env["LIGHT_QUEUE"])


@pytest.fixture(scope="session")
def api(integration_env):
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app()) as client:
        yield client


@pytest.fixture(scope="session")
def worker_process(stack_env, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """A real Celery worker process on the stack's queue."""
    log_path = tmp_path_factory.mktemp("logs") / "worker.log"
    env = {**os.environ, **stack_env}
    cmd = [sys.executable, "-m", "cli", "worker"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wait_for(
        lambda: b"ready." in log_path.read_bytes() or proc.poll() is not None, 90, "worker ready"
    )
    assert proc.poll() is None, log_path.read_text()[-3000:]
    proc.log_path = log_path  # type: ignore[attr-defined]
    yield proc
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def server_url(stack_env, tmp_path_factory) -> Iterator[str]:
    """The API as a real uvicorn process (no embedded worker)."""
    import httpx

    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "api.log"
    env = {**os.environ, **stack_env}
    cmd = [sys.executable, "-m", "cli", "serve", "--no-worker", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 60, "API ready")
    yield url
    proc.terminate()
    try:
        proc.wait(45)  # uvicorn's graceful stop is capped at STOP_GRACE_SECONDS (30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)

"""Metrics and traceable logs across the real processes: an API (uvicorn) and a Celery
worker, both with LOG_FORMAT=json, on queues of their own; one tiny job through both."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from tests.conftest import REDIS_URL, REPO, free_port, wait_for
from tests.helpers import imagefolder_zip

pytestmark = pytest.mark.integration


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus' text format, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit(" ", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return lines


def start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def stack(integration_env, tmp_path_factory) -> Iterator[dict[str, Any]]:
    import redis

    logs = tmp_path_factory.mktemp("obs-logs")
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        **integration_env,
        "TASK_QUEUE": f"obs-{secrets.token_hex(4)}",
        "LIGHT_QUEUE": f"obs-light-{secrets.token_hex(4)}",
        "LOG_FORMAT": "json",
        "WORKER_METRICS_PORT": str(metrics_port),
        "OMP_NUM_THREADS": "1",
    }
    api = start(
        [sys.executable, "-m", "cli", "serve", "--no-worker", "--port", str(port)],
        env,
        logs / "api.log",
    )
    worker = start([sys.executable, "-m", "cli", "worker"], env, logs / "worker.log")
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        for proc, name in ((api, "api"), (worker, "worker")):
            assert proc.poll() is None, (logs / f"{name}.log").read_text()[-3000:]
        try:
            httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 90, "API and worker metrics ready")
        yield {"url": url, "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "logs": logs}
    finally:
        stop(api)
        stop(worker)
        redis.Redis.from_url(REDIS_URL).delete(env["TASK_QUEUE"], env["LIGHT_QUEUE"])


@pytest.fixture(scope="module")
def finished_job(stack) -> dict[str, Any]:
    """A one-epoch job submitted with our own X-Request-ID, trained to the end."""
    url = stack["url"]
    data = imagefolder_zip({"a": 4, "b": 4})
    ds = httpx.post(
        f"{url}/v1/datasets", files={"file": ("d.zip", data, "application/zip")}, timeout=60
    )
    assert ds.status_code == 201, ds.text
    rid = f"obs-{secrets.token_hex(6)}"
    resp = httpx.post(
        f"{url}/v1/jobs",
        json={"dataset_id": ds.json()["id"], "epochs": 1, "image_size": 32, "recipe": "manual"},
        headers={"X-Request-ID": rid},
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    assert resp.headers["x-request-id"] == rid
    job_id = resp.json()["id"]

    def ended() -> dict[str, Any] | None:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    job = wait_for(ended, 240, f"job {job_id} to end", interval=1.0)
    assert job["status"] == "succeeded", job
    return {"id": job_id, "request_id": rid}


def test_api_metrics_count_requests_by_route_template_not_raw_path(stack, finished_job):
    url = stack["url"]
    for _ in range(3):
        assert httpx.get(f"{url}/v1/jobs/job_missing{secrets.token_hex(3)}").status_code == 404
    text = httpx.get(f"{url}/metrics").text
    assert sample(
        text, "finetune_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="404"
    ) == pytest.approx(3.0)
    assert "job_missing" not in text  # the raw path is never a label
    count = sample(
        text,
        "finetune_http_request_duration_seconds_count",
        method="POST",
        route="/v1/jobs",
    )
    assert count is not None and count >= 1
    assert (sample(text, "finetune_jobs", status="succeeded") or 0) >= 1
    assert sample(text, "finetune_queue_depth") is not None


def test_worker_metrics_show_the_finished_job_and_its_epochs(stack, finished_job):
    text = httpx.get(stack["metrics"], timeout=5).text
    assert sample(text, "finetune_worker_jobs_started_total") == pytest.approx(1.0)
    assert sample(text, "finetune_worker_jobs_finished_total", status="succeeded") == pytest.approx(
        1.0
    )
    assert (sample(text, "finetune_worker_epoch_duration_seconds_count") or 0) >= 1
    assert (sample(text, "finetune_worker_images_per_second") or 0) > 0
    assert "finetune_worker_gpu_max_memory_bytes" not in text  # a CPU worker: no series


def test_worker_log_lines_of_a_job_carry_its_id_and_the_submitting_request_id(stack, finished_job):
    lines = json_lines(stack["logs"] / "worker.log")
    ours = [line for line in lines if line.get("job_id") == finished_job["id"]]
    assert ours, "no worker log line names the job"
    assert all(line["request_id"] == finished_job["request_id"] for line in ours)
    assert {"ts", "level", "logger", "message"} <= set(ours[0])
    api_lines = json_lines(stack["logs"] / "api.log")
    assert any(line.get("request_id") == finished_job["request_id"] for line in api_lines)


def test_serve_with_two_api_processes_counts_the_requests_of_both(integration_env, tmp_path):
    """With --workers 2 the requests land on either process; every scrape, whichever
    process answers it, has them all (PROMETHEUS_MULTIPROC_DIR)."""
    port = free_port()
    env = {**os.environ, **integration_env, "DATA_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "cli", "serve", "--no-worker", "--workers", "2"]
    api = start([*cmd, "--port", str(port)], env, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert api.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 60, "API ready")
        first = httpx.get(f"{url}/metrics").text
        before = sample(first, "finetune_http_requests_total", route="/healthz", status="200")
        counters = tmp_path / "prometheus-multiproc"

        def one() -> int:  # a new connection each
            return httpx.get(f"{url}/healthz", timeout=10).status_code

        # Which process accepts a connection is the kernel's choice: one of them can win
        # every sequential accept. Send bursts of concurrent requests until both processes
        # have answered some (each writes its own counter file on its first request).
        sent = 0
        deadline = time.monotonic() + 60
        with ThreadPoolExecutor(8) as pool:
            while len(list(counters.glob("counter_*.db"))) < 2 or sent < 20:
                assert time.monotonic() < deadline, "one API process answered every request"
                assert set(pool.map(lambda _: one(), range(16))) == {200}
                sent += 16
        assert len(list(counters.glob("counter_*.db"))) == 2
        for _ in range(4):
            text = httpx.get(f"{url}/metrics").text
            total = sample(text, "finetune_http_requests_total", route="/healthz", status="200")
            assert total is not None and total >= sent + (before or 0), text[-2000:]
    finally:
        stop(api)


def test_metrics_need_the_token_when_one_is_set_and_can_be_turned_off(integration_env):
    guarded = TestClient(create_app_with(metrics_token="s3cret"))
    refused = guarded.get("/metrics")
    assert refused.status_code == 401 and "METRICS_TOKEN" in refused.json()["detail"]
    assert guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = guarded.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and "finetune_http_requests_total" in ok.text
    off = TestClient(create_app_with(metrics_enabled=False)).get("/metrics")
    assert off.status_code == 404 and "METRICS_ENABLED" in off.json()["detail"]


def test_metrics_are_not_in_the_openapi_schema(integration_env):
    assert "/metrics" not in create_app_with().openapi()["paths"]


def create_app_with(**overrides: Any) -> Any:
    from service.main import create_app

    return create_app(Settings(**overrides))

"""A job with `gpus: 2` through the real path: the API routes it, a real Celery worker
(ALLOW_CPU_DISTRIBUTED: two gloo ranks on this CPU) trains it, its progress and epochs
reach the job row, and a cancel with stop-and-keep stops both ranks and keeps a model."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, wait_for
from tests.helpers import digits_samples, digits_zip

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ddp_env(stack_env) -> Iterator[dict[str, str]]:
    import redis

    env = {
        **stack_env,
        "TASK_QUEUE": f"ddp-{secrets.token_hex(4)}",
        "LIGHT_QUEUE": f"ddp-light-{secrets.token_hex(4)}",
        "ALLOW_CPU_DISTRIBUTED": "true",
    }
    yield env
    redis.Redis.from_url(env["BROKER_URL"]).delete(env["TASK_QUEUE"], env["LIGHT_QUEUE"])


@pytest.fixture(scope="module")
def ddp_worker(ddp_env, tmp_path_factory) -> Iterator[subprocess.Popen]:
    log_path = tmp_path_factory.mktemp("logs") / "ddp-worker.log"
    env = {**os.environ, **ddp_env}
    cmd = [sys.executable, "-m", "cli", "worker", "--queues", "training"]
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
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(ddp_env):
    from fastapi.testclient import TestClient

    from core.settings import Settings, get_settings
    from service.main import create_app

    settings = Settings(
        task_queue=ddp_env["TASK_QUEUE"],
        light_queue=ddp_env["LIGHT_QUEUE"],
        allow_cpu_distributed=True,
    )
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as c:
        yield c


def submit(client, dataset_id: str, **fields) -> str:
    body = {
        "dataset_id": dataset_id,
        "gpus": 2,
        "device": "cpu",
        "recipe": "manual",
        "strategy": "full",
        "image_size": 32,
        "batch_size": 8,
        "augmentation": {"hflip": False},
        **fields,
    }
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    assert resp.json()["config"]["gpus"] == 2
    return str(resp.json()["id"])


def follow(client, job_id: str, worker, until, timeout: float = 400) -> list[dict]:
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(client.get(f"/v1/jobs/{job_id}").json())
        if until(seen[-1]):
            return seen
        time.sleep(0.5)
    pytest.fail(f"job {job_id}: {seen[-1]}; worker log:\n{worker.log_path.read_text()[-4000:]}")


def test_a_two_process_job_trains_reports_and_cancels_on_a_real_worker(client, ddp_worker):
    train, _ = digits_samples(limit=300)
    files = {"file": ("digits.zip", digits_zip(train), "application/zip")}
    ds = client.post("/v1/datasets", files=files)
    assert ds.status_code == 201, ds.text
    dataset_id = ds.json()["id"]
    too_many = client.post("/v1/jobs", json={"dataset_id": dataset_id, "gpus": 9})
    assert too_many.status_code == 422
    assert "gpus: Input should be less than or equal to 8" in too_many.json()["detail"]
    no_gpus = client.post("/v1/jobs", json={"dataset_id": dataset_id, "gpus": 2, "device": "gpu"})
    assert no_gpus.status_code == 422 and "no live worker sees 2 GPUs" in no_gpus.text

    job_id = submit(client, dataset_id, epochs=2)
    seen = follow(client, job_id, ddp_worker, lambda s: s["status"] in ("succeeded", "failed"))
    final = seen[-1]
    assert final["status"] == "succeeded", final["error"]
    running = [s for s in seen if s["status"] == "running" and s["progress"]["total_steps"]]
    assert running, "no progress was relayed from the ranks"
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()
    assert [m["epoch"] for m in metrics["data"]] == [1, 2]
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    # Each rank's steps: its half of the training images, 8 a step.
    n_train = len(train) - report["validation"]["num_samples"]
    assert final["progress"]["total_steps"] == 2 * (((n_train + 1) // 2) // 8)
    assert report["training"]["distributed"] == {"processes": 2, "backend": "gloo"}
    assert report["validation"]["top1_accuracy"] > 0.2  # chance is 0.1
    assert final["model_available"]
    model = client.get(f"/v1/jobs/{job_id}/model", follow_redirects=False)
    assert model.status_code in (200, 307), model.text  # S3: a presigned redirect

    # Cancel while both ranks train: they stop at one step, the best epoch is kept.
    job_id = submit(client, dataset_id, epochs=30)
    follow(client, job_id, ddp_worker, lambda s: (s.get("progress") or {}).get("epoch", 0) >= 2)
    resp = client.post(f"/v1/jobs/{job_id}/cancel", json={"mode": "stop-and-keep"})
    assert resp.status_code in (200, 202), resp.text
    seen = follow(client, job_id, ddp_worker, lambda s: s["status"] in ("canceled", "failed"))
    assert seen[-1]["status"] == "canceled", seen[-1]
    assert seen[-1]["model_available"] and seen[-1]["progress"]["epoch"] < 30

"""Workers publish what they can run, and the API submits and routes by it (core/fleet.py):
a real worker's row, and a job sent to the GPU queue while a GPU worker is on record."""

import secrets

import pytest

from core import fleet
from core.db import session_scope
from core.models import Worker
from tests.conftest import wait_for
from tests.helpers import imagefolder_zip

pytestmark = pytest.mark.integration


def test_a_running_worker_publishes_its_device_queues_and_backbones(stack_env, worker_process):
    from core.settings import Settings

    settings = Settings(database_url=stack_env["DATABASE_URL"])

    def published():
        with session_scope(settings) as session:
            rows = session.query(Worker).all()
            return [r for r in rows if stack_env["TASK_QUEUE"] in r.queues]

    try:
        (row,) = wait_for(published, 60, "the worker's row")
    except TimeoutError:
        raise AssertionError(worker_process.log_path.read_text()[-3000:]) from None
    assert row.device_kind == "cpu" and row.memory_bytes > 2**20
    assert stack_env["LIGHT_QUEUE"] in row.queues
    assert "efficientnet_lite0" in row.backbones and "convnext_tiny" not in row.backbones


def test_jobs_go_to_the_gpu_queue_while_a_gpu_worker_is_live(integration_env, tmp_path):
    import redis
    from fastapi.testclient import TestClient

    from core.settings import Settings, get_settings
    from service.main import create_app

    settings = Settings(gpu_queue=f"test-gpu-{secrets.token_hex(4)}")
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    r = redis.Redis.from_url(integration_env["BROKER_URL"])
    gpu = fleet.Capabilities("gpu-host", [settings.gpu_queue], "cuda", "H100", 80 * 2**30, [])
    gpu.backbones = ["efficientnet_lite0"]
    with TestClient(app) as client:
        files = {"file": ("d.zip", imagefolder_zip({"a": 4, "b": 4}), "application/zip")}
        ds = client.post("/v1/datasets", files=files).json()["id"]
        no_gpu = client.post("/v1/jobs", json={"dataset_id": ds, "device": "gpu"})
        assert no_gpu.status_code == 422 and "no live worker has a GPU" in no_gpu.text
        try:
            fleet.publish(settings, f"gpu0-{secrets.token_hex(3)}@gpu-host", gpu)
            job = client.post("/v1/jobs", json={"dataset_id": ds})  # device auto
            assert job.status_code == 201, job.text
            assert job.json()["config"]["device"] == "auto"
            queued = r.lrange(settings.gpu_queue, 0, -1)
            assert any(job.json()["id"].encode() in m for m in queued)
            cpu = client.post("/v1/jobs", json={"dataset_id": ds, "device": "cpu"})
            assert cpu.status_code == 422 and "no live worker consumes TASK_QUEUE" in cpu.text
            listed = {b["name"]: b for b in client.get("/v1/backbones").json()["data"]}
            assert listed["efficientnet_lite0"]["weights_available"]  # what submit accepts
            assert not listed["efficientnet_lite1"]["weights_available"]
            lite1 = client.post(
                "/v1/jobs",
                json={"dataset_id": ds, "device": "gpu", "backbone": "efficientnet_lite1"},
            )
            assert lite1.json()["error_code"] == "WEIGHTS_UNAVAILABLE"
            assert "no live GPU worker has them; usable now: efficientnet_lite0." in lite1.text
        finally:
            with session_scope(settings) as session:
                session.query(Worker).filter(Worker.hostname == "gpu-host").delete()
            r.delete(settings.gpu_queue)

"""POST/GET /v1/jobs against PostgreSQL and Redis (no worker: jobs stay queued)."""

import pytest

from tests.helpers import imagefolder_zip, noise_image, png_bytes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset_id(api):
    resp = api.post(
        "/v1/datasets",
        files={"file": ("d.zip", imagefolder_zip({"a": 4, "b": 4}), "application/zip")},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def test_create_job_returns_queued_with_defaults_and_sends_the_task(
    api, dataset_id, integration_env
):
    import redis

    resp = api.post("/v1/jobs", json={"dataset_id": dataset_id, "epochs": 2, "image_size": 64})
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["status"] == "queued" and job["id"].startswith("job_")
    assert job["config"]["backbone"] == "efficientnet_lite0"
    assert job["progress"]["total_epochs"] == 2 and job["progress"]["fraction"] == 0.0
    assert job["model_available"] is False
    assert job["config"]["max_duration_seconds"] == 12 * 3600  # the service's limit
    # The task really is on the Redis queue, by name, carrying only the id.
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    queued = r.lrange(integration_env["TASK_QUEUE"], 0, -1)
    assert any(job["id"].encode() in m and b"finetune.train_job" in m for m in queued)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 10_000}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"learning_rate": 5}, "learning_rate"),
        ({"image_size": 8}, "image_size"),
        ({"val_fraction": 0.95}, "val_fraction"),
        ({"backbone": "alexnet"}, "backbone"),
        ({"augmentation": {"hflip": "sometimes"}}, "hflip"),
        ({"strategy": "yolo"}, "strategy"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"schedule": "sawtooth"}, "schedule"),
        ({"early_stopping": {"patience": 0}}, "patience"),
        ({"label_smoothing": 0.9}, "label_smoothing"),
        ({"time_budget_seconds": 1}, "time_budget_seconds"),
        ({"max_duration_seconds": 1}, "max_duration_seconds"),
        ({"augmentation": {"preset": "extreme"}}, "preset"),
        ({"augmentation": {"ops": [{"name": "warp"}]}}, "warp"),
        ({"augmentation": {"ops": [{"name": "rotation", "degrees": 500}]}}, "degrees"),
        ({"augmentation": {"ops": [{"name": "rotation", "angle": 5}]}}, "angle"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_out_of_range_hyper_parameters_are_a_422_naming_the_field(api, dataset_id, change, field):
    resp = api.post("/v1/jobs", json={"dataset_id": dataset_id, **change})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error_code"] == "VALIDATION_ERROR"
    assert field in body["detail"]


def test_unknown_backbone_lists_the_available_ones(api, dataset_id):
    detail = api.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "alexnet"}).json()[
        "detail"
    ]
    assert "efficientnet_lite0" in detail and "resnet50" in detail


def test_unknown_dataset_in_a_job_is_a_404(api):
    resp = api.post("/v1/jobs", json={"dataset_id": "ds_nope"})
    assert resp.status_code == 404
    assert resp.json()["error_code"] == "DATASET_NOT_FOUND"
    assert "ds_nope" in resp.json()["detail"]


def test_unknown_job_is_a_404_everywhere(api):
    for path in ("/v1/jobs/job_nope", "/v1/jobs/job_nope/metrics", "/v1/jobs/job_nope/model"):
        resp = api.get(path)
        assert resp.status_code == 404 and resp.json()["error_code"] == "JOB_NOT_FOUND"


def test_model_of_an_unfinished_job_is_a_409(api, dataset_id):
    job = api.post("/v1/jobs", json={"dataset_id": dataset_id}).json()
    resp = api.get(f"/v1/jobs/{job['id']}/model")
    assert resp.status_code == 409 and resp.json()["error_code"] == "MODEL_NOT_AVAILABLE"
    image = ("files", ("x.png", png_bytes(noise_image(0)), "image/png"))
    resp = api.post(f"/v1/jobs/{job['id']}/predict", files=[image])
    assert resp.status_code == 409 and resp.json()["error_code"] == "MODEL_NOT_AVAILABLE"
    assert "queued" in resp.json()["detail"]


def test_list_jobs_paginates_and_filters_by_status(api, dataset_id):
    ids = [api.post("/v1/jobs", json={"dataset_id": dataset_id}).json()["id"] for _ in range(3)]
    page = api.get("/v1/jobs", params={"status": "queued", "limit": 2}).json()
    assert len(page["data"]) == 2 and page["count"] >= 3
    assert all(j["status"] == "queued" for j in page["data"])
    everything = api.get("/v1/jobs", params={"limit": 500}).json()["data"]
    assert set(ids) <= {j["id"] for j in everything}
    assert (
        api.get("/v1/jobs", params={"status": "succeeded", "dataset_id": dataset_id}).json()[
            "count"
        ]
        == 0
    )
    bad = api.get("/v1/jobs", params={"status": "sleeping"})
    assert bad.status_code == 422 and "status" in bad.json()["detail"]
    assert api.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_unreachable_broker_fails_the_job_clearly_instead_of_leaving_it_queued(
    integration_env, dataset_id
):
    from fastapi.testclient import TestClient

    from core import queue
    from core.settings import Settings, get_settings
    from service.main import create_app

    closed = f"redis://127.0.0.1:{_closed_port()}/0"
    settings = Settings(broker_url=closed)
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as client:
        resp = client.post("/v1/jobs", json={"dataset_id": dataset_id})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error_code"] == "BROKER_UNAVAILABLE"
        failed = client.get("/v1/jobs", params={"status": "failed"}).json()["data"]
        assert failed[0]["error"]["code"] == "BROKER_UNAVAILABLE"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("error")
    queue._client.cache_clear()


def test_health_and_readiness(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_backbones_are_listed_with_their_weights_availability(api):
    data = {b["name"]: b for b in api.get("/v1/backbones").json()["data"]}
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert data[name]["weights_available"] and data[name]["weights_source"] == "package"
    # The test caches are empty, so hub-only backbones have no weights here.
    assert (
        data["resnet50"]["weights_available"] is False
        and data["resnet50"]["weights_source"] is None
    )
    assert data["efficientnet_lite0"]["default_input_size"] == 224
    assert data["efficientnet_lite0"]["mean"] == [0.5, 0.5, 0.5]
    assert {
        "resnet18",
        "mobilenetv3_large_100",
        "efficientnet_b0",
        "convnext_tiny",
        "vit_base_patch16_224",
    } <= set(data)


def test_a_backbone_without_weights_is_refused_at_submit_listing_usable_ones(api, dataset_id):
    resp = api.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "convnext_tiny"})
    assert resp.status_code == 422
    body = resp.json()
    assert body["error_code"] == "WEIGHTS_UNAVAILABLE"
    assert "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2" in body["detail"]
    assert "finetune weights pull convnext_tiny" in body["detail"]


def test_a_weights_file_makes_a_backbone_usable(api, dataset_id, integration_env, tmp_path):
    from fastapi.testclient import TestClient

    from core.settings import Settings, get_settings
    from service.main import create_app

    (tmp_path / "resnet18.safetensors").write_bytes(b"placeholder: availability is by file")
    settings = Settings(weights_dir=tmp_path)
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as client:
        data = {b["name"]: b for b in client.get("/v1/backbones").json()["data"]}
        assert data["resnet18"]["weights_source"] == "file"
        resp = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "resnet18"})
        assert resp.status_code == 201, resp.text


def test_report_and_plots_of_an_unfinished_job_say_when_they_come(api, dataset_id):
    job = api.post("/v1/jobs", json={"dataset_id": dataset_id}).json()
    report = api.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 409 and report.json()["error_code"] == "REPORT_NOT_AVAILABLE"
    plot = api.get(f"/v1/jobs/{job['id']}/plots/curves.png")
    assert plot.status_code == 404 and plot.json()["error_code"] == "PLOT_NOT_AVAILABLE"


def _closed_port() -> int:
    from tests.conftest import free_port

    return free_port()

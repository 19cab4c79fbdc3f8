"""One job spec: what the API stores is what the worker runs, and nothing is dropped."""

import pytest
from sqlalchemy import update

from core.db import session_scope
from core.models import Job
from tests.helpers import imagefolder_zip

pytestmark = pytest.mark.integration


@pytest.fixture()
def dataset_id(api):
    return api.post(
        "/v1/datasets",
        files={"file": ("d.zip", imagefolder_zip({"a": 3, "b": 3}), "application/zip")},
    ).json()["id"]


@pytest.mark.parametrize(
    ("backbone", "size"),
    [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)],
)
def test_backbone_defaults_are_resolved_at_submit_and_stored(api, dataset_id, backbone, size):
    job = api.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": backbone}).json()
    assert job["config"]["image_size"] == size
    assert job["config"]["mean"] == [0.5, 0.5, 0.5] and job["config"]["std"] == [0.5, 0.5, 0.5]
    api.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_size_the_user_sets_wins_over_the_backbone_default(api, dataset_id):
    job = api.post(
        "/v1/jobs",
        json={"dataset_id": dataset_id, "backbone": "efficientnet_lite2", "image_size": 96},
    ).json()
    assert job["config"]["image_size"] == 96
    api.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_config_key_the_worker_does_not_know_fails_the_job_clearly(api, dataset_id):
    from worker.tasks import run_job

    job_id = api.post(
        "/v1/jobs", json={"dataset_id": dataset_id, "epochs": 1, "image_size": 32}
    ).json()["id"]
    with session_scope() as s:  # as if a newer API had stored a field this worker lacks
        config = s.get(Job, job_id).config
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                config={
                    **config,
                    "mixed_precision_level": 3,
                    "augmentation": {**config["augmentation"], "warp": True},
                }
            )
        )
    assert run_job(job_id, worker_id="w-spec") == "failed"
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "DATA_ERROR"
    message = job["error"]["message"]
    assert "mixed_precision_level" in message and "augmentation.warp" in message
    assert "does not know" in message

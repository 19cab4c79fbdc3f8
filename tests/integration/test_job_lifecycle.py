"""The job row is the truth: guarded transitions on PostgreSQL, failures recorded."""

import threading

import pytest

from core import transitions
from core.db import session_scope
from core.models import Job
from tests.helpers import imagefolder_zip, s3_client

pytestmark = pytest.mark.integration


@pytest.fixture()
def job_id(api):
    ds = api.post(
        "/v1/datasets",
        files={"file": ("d.zip", imagefolder_zip({"a": 3, "b": 3}), "application/zip")},
    )
    return api.post(
        "/v1/jobs", json={"dataset_id": ds.json()["id"], "epochs": 1, "image_size": 32}
    ).json()["id"]


def test_only_one_of_many_concurrent_claims_wins(job_id):
    wins = []
    barrier = threading.Barrier(8)

    def contender(i):
        barrier.wait()
        with session_scope() as s:
            if transitions.claim(s, job_id, f"worker-{i}"):
                wins.append(i)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert (
            job.status == "running" and job.worker_id == f"worker-{wins[0]}" and job.attempts == 1
        )


def test_a_duplicate_delivery_exits_without_training(job_id):
    from worker.tasks import run_job

    with session_scope() as s:
        assert transitions.claim(s, job_id, "first-worker")
    assert run_job(job_id, worker_id="second-worker") == "running"
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.worker_id == "first-worker" and job.attempts == 1 and job.phase == "starting"


def test_a_worker_that_lost_its_job_cannot_write_to_it(job_id):
    with session_scope() as s:
        assert transitions.claim(s, job_id, "owner")
        assert not transitions.heartbeat(s, job_id, "impostor")
        assert not transitions.succeed(s, job_id, "impostor", {"bundle_key": "x"})
        assert transitions.heartbeat(s, job_id, "owner")


def test_a_failed_job_records_why(api, job_id, integration_env):
    from worker.tasks import run_job

    ds_id = api.get(f"/v1/jobs/{job_id}").json()["dataset_id"]
    s3 = s3_client(integration_env)
    s3.delete_object(Bucket=integration_env["S3_BUCKET"], Key=f"datasets/{ds_id}/images.zip")
    assert run_job(job_id, worker_id="w1") == "failed"
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["finished_at"]
    assert job["error"]["code"] == "DATA_ERROR" and "deleted" in job["error"]["message"]
    assert "images.zip" in job["error"]["message"]
    with session_scope() as s:
        assert "Traceback" in s.get(Job, job_id).error_traceback

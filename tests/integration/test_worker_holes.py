"""Worker-side holes from the attack review (issue 11): checkpoints that outlived their job,
dataset copies that outlived their dataset or grew without bound, and a shutdown that cost
the job a second attempt. Real PostgreSQL and S3; one test runs a real worker process."""

import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from core import transitions
from core.db import session_scope, utcnow
from core.models import Job
from core.settings import Settings, get_settings
from core.storage import StorageError
from tests.conftest import REPO, wait_for
from tests.helpers import digits_samples, digits_zip, imagefolder_zip, s3_client

pytestmark = pytest.mark.integration


@pytest.fixture()
def dataset_id(api):
    data = imagefolder_zip({"a": 3, "b": 3})
    resp = api.post("/v1/datasets", files={"file": ("d.zip", data, "application/zip")})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def new_job(api, dataset_id):
    body = {"dataset_id": dataset_id, "epochs": 1, "image_size": 32}
    resp = api.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


@pytest.fixture()
def job_id(api, dataset_id):
    return new_job(api, dataset_id)


def set_row(job_id, **values):
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()


def put_checkpoint(env, job_id, attempt=1):
    key = f"jobs/{job_id}/checkpoints/attempt-{attempt}.pt"
    s3_client(env).put_object(Bucket=env["S3_BUCKET"], Key=key, Body=b"\0" * 4096)
    return key


def checkpoints(env, job_id):
    listing = s3_client(env).list_objects_v2(
        Bucket=env["S3_BUCKET"], Prefix=f"jobs/{job_id}/checkpoints/"
    )
    return [o["Key"] for o in listing.get("Contents", [])]


def row(job_id):
    with session_scope() as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        return job


# --- 1. every end of a job deletes its checkpoints; a retry keeps them -------------------


def test_a_job_that_fails_deletes_its_checkpoints(api, job_id, dataset_id, integration_env):
    from worker.lifecycle import run_job

    key = put_checkpoint(integration_env, job_id)
    set_row(job_id, status="interrupted", attempts=1, checkpoint_key=key)
    s3_client(integration_env).delete_object(
        Bucket=integration_env["S3_BUCKET"], Key=f"datasets/{dataset_id}/images.zip"
    )
    assert run_job(job_id, worker_id="w1") == "failed"
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["error"]["code"] == "DATA_ERROR"
    assert checkpoints(integration_env, job_id) == []
    assert not job["checkpoint_available"]


def test_a_transient_failure_keeps_its_checkpoints_until_the_last_attempt(
    job_id, integration_env, monkeypatch
):
    import worker.lifecycle as lifecycle

    def store_down(*_args, **_kwargs):
        raise StorageError("the object store is unreachable")

    monkeypatch.setattr(lifecycle, "fetch_dataset", store_down)
    monkeypatch.setattr(lifecycle, "send_train", lambda *a, **k: None)
    key = put_checkpoint(integration_env, job_id)
    set_row(job_id, status="interrupted", attempts=0, checkpoint_key=key)
    assert lifecycle.run_job(job_id, worker_id="w1") == "retrying"
    assert checkpoints(integration_env, job_id) == [key]  # the retry resumes from it
    assert row(job_id).status == "interrupted" and row(job_id).checkpoint_key == key

    set_row(job_id, attempts=get_settings().max_attempts - 1)
    assert lifecycle.run_job(job_id, worker_id="w2") == "failed"
    assert row(job_id).error_code == "STORAGE_UNAVAILABLE"
    assert checkpoints(integration_env, job_id) == []
    assert row(job_id).checkpoint_key is None


def test_a_job_failed_by_the_reaper_loses_its_checkpoints(job_id, integration_env):
    from core.reaper import reap_once

    settings = get_settings()
    with session_scope() as s:
        assert transitions.claim(s, job_id, "dead-worker")
    key = put_checkpoint(integration_env, job_id)
    long_ago = utcnow() - timedelta(seconds=settings.stale_after_seconds + 60)
    set_row(job_id, attempts=settings.max_attempts, heartbeat_at=long_ago, checkpoint_key=key)
    _, failed = reap_once(settings)
    assert job_id in failed and row(job_id).error_code == "WORKER_LOST"
    assert checkpoints(integration_env, job_id) == []
    assert row(job_id).checkpoint_key is None


def test_a_job_failed_at_the_hard_limit_loses_its_checkpoints(job_id, integration_env):
    from core.reaper import reap_once
    from worker.lease import Heartbeat
    from worker.reporting import DbReporter

    settings = get_settings()
    with session_scope() as s:
        assert transitions.claim(s, job_id, "hung-worker")
    key = put_checkpoint(integration_env, job_id)
    set_row(job_id, checkpoint_key=key)
    killed = threading.Event()
    reporter = DbReporter(job_id, "hung-worker", settings, 1)
    Heartbeat(job_id, "hung-worker", settings, reporter, 0.0, killed.set)._hard_limit()
    assert killed.is_set() and row(job_id).error_code == "TIME_LIMIT_EXCEEDED"
    reap_once(settings)  # the killed worker cannot; any reaper (API, other workers) does
    assert checkpoints(integration_env, job_id) == []


def test_canceling_an_interrupted_job_deletes_its_checkpoints(api, job_id, integration_env):
    from core.reaper import reap_once

    key = put_checkpoint(integration_env, job_id)
    set_row(job_id, status="interrupted", attempts=1, heartbeat_at=utcnow(), checkpoint_key=key)
    reap_once(get_settings())
    assert checkpoints(integration_env, job_id) == [key]  # it will resume: kept
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
    reap_once(get_settings())
    assert checkpoints(integration_env, job_id) == []


def test_a_lost_attempts_late_checkpoint_does_not_outlive_the_job(job_id, integration_env):
    from worker.attempt import begin
    from worker.ending import EndReason, Observed
    from worker.lifecycle import claim, finish

    settings = get_settings()
    run = begin(claim(job_id, "slow-worker", settings), "slow-worker", settings)
    # The reaper gave up on it, and only then did its checkpoint write land.
    with session_scope() as s:
        assert transitions.fail(s, job_id, code="WORKER_LOST", message="x", worker_id="slow-worker")
    put_checkpoint(integration_env, job_id)
    try:
        assert finish(run, EndReason.LOST, Observed(lost=True), None) == "lost"
    finally:
        shutil.rmtree(run.workdir)
    assert checkpoints(integration_env, job_id) == []


# --- 2. dataset copies on worker hosts: dropped when deleted, bounded in size ------------


def cache_settings(tmp_path, **values):
    return get_settings().model_copy(update={"worker_cache_dir": tmp_path, **values})


def fetch(settings, dataset_id):
    from core.storage import get_store
    from worker.cache import in_use
    from worker.datasets import fetch_dataset

    keys = (f"datasets/{dataset_id}/images.zip", f"datasets/{dataset_id}/index.json")
    with in_use(settings, dataset_id):
        archive, _ = fetch_dataset(settings, get_store(settings), dataset_id, *keys)
    return archive


def test_a_deleted_datasets_cached_copy_is_dropped(api, tmp_path):
    from worker import cache

    settings = cache_settings(tmp_path)
    deleted, kept = (
        api.post("/v1/datasets", files={"file": ("d.zip", data, "application/zip")}).json()["id"]
        for data in (imagefolder_zip({"a": 2, "b": 2}), imagefolder_zip({"c": 2, "d": 2}))
    )
    for ds in (deleted, kept):
        assert fetch(settings, ds).is_file()
    (cache.dataset_dir(settings, "ds_no_such_row") / "images.zip").parent.mkdir(parents=True)
    assert api.delete(f"/v1/datasets/{deleted}").status_code == 204
    cache.tidy(settings)
    left = sorted(p.name for p in cache.datasets_dir(settings).iterdir())
    assert left == [kept]


def test_a_cached_copy_in_use_is_never_removed(api, dataset_id, tmp_path):
    from worker import cache
    from worker.datasets import DatasetFilesMissing

    settings = cache_settings(tmp_path)
    fetch(settings, dataset_id)
    assert api.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    folder = cache.dataset_dir(settings, dataset_id)
    with cache.in_use(settings, dataset_id):
        assert cache.drop_deleted(settings) == []
        assert (folder / "images.zip").is_file()
    assert cache.drop_deleted(settings) == [dataset_id] and not folder.exists()
    # A start racing the delete finds the dataset gone, not a half-removed folder.
    with pytest.raises(DatasetFilesMissing):
        fetch(settings, dataset_id)


def test_a_reader_never_sees_its_folder_pulled_away(tmp_path):
    from worker import cache

    settings = cache_settings(tmp_path)
    done, errors = threading.Event(), []

    def reader():
        try:
            for i in range(200):
                with cache.in_use(settings, "ds_busy") as folder:
                    (folder / "images.zip").write_bytes(b"%d" % i)
                    time.sleep(0.001)  # the remover tries while the copy is in use...
                    assert (folder / "images.zip").read_bytes() == b"%d" % i
                time.sleep(0.001)  # ...and gets it between two uses
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    removed = 0
    while not done.is_set():
        removed += cache._remove_unless_in_use(cache.dataset_dir(settings, "ds_busy"))
    thread.join()
    assert errors == [] and removed > 0


def test_the_cache_evicts_the_least_recently_used_datasets_not_in_use(tmp_path):
    from worker import cache

    settings = cache_settings(tmp_path, worker_cache_max_bytes=2500)
    for name in ("ds_a", "ds_b", "ds_c"):
        with cache.in_use(settings, name) as folder:
            (folder / "images.zip").write_bytes(b"\0" * 1000)
    assert cache.trim(cache_settings(tmp_path, worker_cache_max_bytes=3000)) == []
    with cache.in_use(settings, "ds_b") as busy:
        for name, used in (("ds_b", 100), ("ds_a", 200), ("ds_c", 300)):
            os.utime(cache.dataset_dir(settings, name) / cache.LOCK, (used, used))
        assert cache.trim(settings) == ["ds_a"]  # ds_b is older, but a job reads it
        assert (busy / "images.zip").is_file()
    assert sorted(p.name for p in cache.datasets_dir(settings).iterdir()) == ["ds_b", "ds_c"]


def test_a_worker_drops_the_copy_of_a_dataset_deleted_after_its_job(integration_env, tmp_path):
    from fastapi.testclient import TestClient

    from service.main import create_app
    from tests.integration.test_faults import submit, wait_job

    env = {
        **integration_env,
        "TASK_QUEUE": f"holes-{secrets.token_hex(4)}",
        "REAPER_INTERVAL_SECONDS": "1",
        "WORKER_CACHE_DIR": str(tmp_path / "cache"),
    }
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker"],
            env={**os.environ, **env},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with TestClient(app) as client:
            train, _ = digits_samples(limit=60)
            job_id = submit(client, digits_zip(train), epochs=1, strategy="linear_probe")
            done = wait_job(client, job_id, lambda j: j["finished_at"], 240, "job done")
            assert done["status"] == "succeeded", done["error"]
            folder = tmp_path / "cache" / "datasets" / done["dataset_id"]
            assert (folder / "images.zip").is_file()
            assert client.delete(f"/v1/datasets/{done['dataset_id']}").status_code == 204
            wait_for(lambda: not folder.exists(), 30, "the cached copy dropped")
    finally:
        worker.kill()
        worker.wait()


# --- 3. a worker that is shutting down claims nothing ------------------------------------


def test_a_worker_shutting_down_leaves_a_task_it_receives_on_the_queue(job_id):
    from celery.exceptions import Reject

    from worker.celery_app import SHUTTING_DOWN
    from worker.tasks import train_job

    SHUTTING_DOWN.set()
    try:
        with pytest.raises(Reject) as refused:
            train_job(job_id)
    finally:
        SHUTTING_DOWN.clear()
    assert refused.value.requeue  # back on the queue for a worker that stays
    job = row(job_id)
    assert job.status == "queued" and job.attempts == 0 and job.started_at is None


def test_progress_counts_the_epochs_a_budget_re_fit_planned(job_id, integration_env):
    """Fewer epochs on a slow machine, more on a fast one: the job's total_epochs, steps
    and ETA follow the plan, never "epoch 12 of 10" or a negative ETA."""
    from worker.reporting import DbReporter

    settings = get_settings()
    with session_scope() as s:
        assert transitions.claim(s, job_id, "fast-worker")
    reporter = DbReporter(job_id, "fast-worker", settings, 10)
    reporter.on_phase("training")
    reporter.on_step(1, 5, 5)
    assert (row(job_id).total_epochs, row(job_id).total_steps) == (10, 50)
    reporter.on_plan(12)
    reporter.on_step(11, 5, 5)
    job = row(job_id)
    assert (job.total_epochs, job.step, job.total_steps) == (12, 55, 60)
    assert job.eta_seconds is not None and job.eta_seconds >= 0
    # A shorter last epoch (11.4: 2 of its 5 steps): counted by the steps it runs; its
    # last step is written (not throttled) like an epoch's last, with nothing left.
    reporter.on_plan(11.4)
    reporter.on_step(12, 2, 5)
    job = row(job_id)
    assert (job.total_epochs, job.step, job.total_steps) == (12, 57, 57)
    assert job.eta_seconds == 0.0
    # Steps past the reporter's plan (one it was not told of) stay throttled: no write each.
    reporter.on_step(12, 3, 5)
    reporter.on_step(12, 4, 5)
    assert row(job_id).step == 57
    # A search's next run (a trial of 2 epochs): its progress starts from nothing, not at
    # "epoch 12 of 2", and its phase (labelled with the run) restarts the ETA's clock.
    reporter.on_run(2)
    reporter.on_phase("search: trial 2/3: training")
    job = row(job_id)
    assert (job.epoch, job.total_epochs, job.step, job.total_steps) == (0, 2, 0, 0)
    reporter.on_step(1, 5, 5)
    job = row(job_id)
    assert (job.epoch, job.total_epochs, job.step, job.total_steps) == (1, 2, 5, 10)
    assert 0 <= job.eta_seconds < 60

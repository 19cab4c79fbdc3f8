"""Jobs that survive: real worker processes killed with SIGKILL, cancel from the API,
the reaper and the retry budget, on real PostgreSQL, Redis and S3."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from tests.conftest import REPO, wait_for
from tests.helpers import digits_samples, digits_zip, get_model, s3_client

pytestmark = pytest.mark.integration


@pytest.fixture()
def fault_env(integration_env):
    return {
        **integration_env,
        "TASK_QUEUE": f"fault-{secrets.token_hex(4)}",
        "HEARTBEAT_SECONDS": "1",
        "STALE_AFTER_SECONDS": "5",
        "REAPER_INTERVAL_SECONDS": "1",
        "PROGRESS_INTERVAL_SECONDS": "0.3",
    }


class Workers:
    def __init__(self, env, tmp_path):
        self.env, self.tmp, self.procs = env, tmp_path, []

    def start(self):
        log = self.tmp / f"worker{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker"],
                env={**os.environ, **self.env},
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc.log = log
        self.procs.append(proc)
        wait_for(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 90, "worker")
        assert proc.poll() is None, log.read_text()[-2000:]
        return proc

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture()
def workers(fault_env, tmp_path):
    w = Workers(fault_env, tmp_path)
    yield w
    w.stop_all()
    import redis

    redis.Redis.from_url(fault_env["BROKER_URL"]).delete(fault_env["TASK_QUEUE"])


@pytest.fixture()
def client(fault_env):
    from core.settings import Settings, get_settings
    from service.main import create_app

    settings = Settings(**{k.lower(): v for k, v in fault_env.items()})
    app = create_app(settings)  # its reaper runs with the fast settings above
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def small_digits():
    train, _ = digits_samples(limit=400)
    return digits_zip(train)


def submit(client, data, **config):
    ds = client.post("/v1/datasets", files={"file": ("d.zip", data, "application/zip")}).json()
    body = {
        "dataset_id": ds["id"],
        # These tests are about surviving faults: no auto-recipe planning (seconds a job;
        # tests/integration/test_auto_recipe.py covers it).
        "recipe": "manual",
        "image_size": 32,
        "probe_epochs": 5,
        "augmentation": {"hflip": False},
        **config,
    }
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def wait_job(client, job_id, predicate, timeout, what):
    def check():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if predicate(job) else None

    return wait_for(check, timeout, what, interval=0.2)


def wait_checkpointed_epoch(client, job_id, epoch=1):
    """Until fine-tuning epoch `epoch` has reported its metrics and some checkpoint (the
    probe's, at least) is recorded: that epoch's own checkpoint may still be on its way."""
    return wait_job(
        client,
        job_id,
        lambda j: (
            j["checkpoint_available"] and (j["latest_metrics"] or {}).get("epoch", 0) >= epoch
        ),
        240,
        f"checkpointed epoch {epoch}",
    )


def test_kill_9_mid_epoch_resumes_from_the_last_checkpoint_on_another_worker(
    client, workers, small_digits, fault_env
):
    job_id = submit(client, small_digits, epochs=3)
    first = workers.start()
    # Let it finish fine-tuning epoch 1 (and checkpoint it), then kill it inside epoch 2.
    wait_job(
        client,
        job_id,
        lambda j: (
            j["progress"]["epoch"] >= 2
            and j["checkpoint_available"]
            and (j["latest_metrics"] or {}).get("epoch", 0) >= 1
        ),
        240,
        "epoch 2 under way",
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic()
    workers.start()
    running_again = wait_job(
        client,
        job_id,
        lambda j: j["status"] == "running" and j["attempts"] == 2,
        60,
        "job running again",
    )
    recovery = time.monotonic() - killed_at
    final = wait_job(
        client, job_id, lambda j: j["status"] in ("succeeded", "failed"), 300, "job done"
    )
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 2 and running_again
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]  # each epoch once
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    assert report["training"]["resumed_from"]["phase"] == "fine_tune"
    assert report["training"]["resumed_from"]["epoch"] >= 1
    assert get_model(client, job_id).status_code == 200
    keys = _checkpoint_gone(fault_env, job_id)  # one final model, not a leftover
    assert sum(k.endswith("model.safetensors") for k in keys) == 1
    print(f"worker death to job running again: {recovery:.1f}s")


def test_a_job_that_keeps_losing_its_worker_fails_after_the_retry_budget(
    client, workers, small_digits, fault_env
):
    job_id = submit(client, small_digits, epochs=50)
    for attempt in (1, 2, 3):
        worker = workers.start()
        wait_job(
            client,
            job_id,
            lambda j, a=attempt: j["status"] == "running" and j["attempts"] == a,
            120,
            f"attempt {attempt} running",
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    final = wait_job(client, job_id, lambda j: j["status"] == "failed", 60, "job failed")
    assert final["error"]["code"] == "WORKER_LOST"
    assert "attempt 3 of 3" in final["error"]["message"]


def test_cancel_queued_job_never_starts(client, workers, small_digits):
    job_id = submit(client, small_digits, epochs=1)
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "canceled"
    worker = workers.start()  # the task is still on the queue: the worker must not train it
    seen = f"job {job_id} not claimed (status canceled)".encode()
    wait_for(lambda: seen in worker.log.read_bytes(), 30, "the task taken and dropped")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled" and job["attempts"] == 0 and job["started_at"] is None
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error_code"] == "JOB_FINISHED"


@pytest.mark.parametrize("mode", ["stop-and-keep", "discard"])
def test_cancel_running_job_stops_it_and_frees_the_worker(client, workers, small_digits, mode):
    job_id = submit(client, small_digits, epochs=50)
    workers.start()
    wait_job(
        client,
        job_id,
        lambda j: (j["latest_metrics"] or {}).get("epoch", 0) >= 1,
        240,
        "one fine-tuning epoch",
    )
    resp = client.post(f"/v1/jobs/{job_id}/cancel", json={"mode": mode})
    assert resp.status_code == 202 and resp.json()["cancel_requested"]
    final = wait_job(client, job_id, lambda j: j["status"] == "canceled", 60, "canceled")
    assert final["progress"]["epoch"] < 50
    model = get_model(client, job_id)
    if mode == "stop-and-keep":
        assert final["model_available"] and model.status_code == 200
    else:
        assert not final["model_available"] and model.status_code == 409
    # The worker is free: the next job runs.
    nxt = submit(client, small_digits, epochs=1, strategy="linear_probe")
    done = wait_job(client, nxt, lambda j: j["status"] in ("succeeded", "failed"), 120, "next job")
    assert done["status"] == "succeeded"


def test_sigterm_hands_the_job_back_and_another_worker_finishes_it(client, workers, small_digits):
    job_id = submit(client, small_digits, epochs=3)
    first = workers.start()
    wait_checkpointed_epoch(client, job_id)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) is not None  # it stops at the next step, not at the end
    handed_back = client.get(f"/v1/jobs/{job_id}").json()
    assert handed_back["status"] in ("interrupted", "running")  # running: already picked up again
    assert handed_back["status"] != "succeeded"
    assert "handed back on shutdown" in first.log.read_text()
    # The stopping worker leaves the job to the next one: it does not take it again itself
    # (which would cost an attempt and hand it back a second time).
    assert handed_back["status"] == "interrupted" and handed_back["attempts"] == 1, handed_back
    assert first.log.read_text().count("handed back on shutdown") == 1
    workers.start()
    final = wait_job(client, job_id, lambda j: j["status"] in ("succeeded", "failed"), 300, "done")
    assert final["status"] == "succeeded" and final["attempts"] == 2
    epochs = [m["epoch"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]
    assert epochs == [0, 1, 2, 3]
    # It went on from the step where SIGTERM stopped it, not from the last whole epoch.
    resumed = client.get(f"/v1/jobs/{job_id}/report").json()["training"]["resumed_from"]
    assert resumed["phase"] == "fine_tune" and resumed["step"] >= 1, resumed
    _checkpoint_gone(workers.env, job_id)


def test_a_broker_redelivery_while_the_job_runs_does_not_train_it_twice(
    fault_env, small_digits, tmp_path
):
    """Redis redelivers an unacknowledged task after the visibility timeout (celery#5935):
    with a 3 s timeout and a longer job, the second worker gets the same task and must
    not train it."""
    from core.settings import Settings, get_settings
    from service.main import create_app

    env = {**fault_env, "BROKER_VISIBILITY_TIMEOUT_SECONDS": "3"}
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    pool = Workers(env, tmp_path)
    try:
        with TestClient(app) as c:
            job_id = submit(c, small_digits, epochs=6)
            first, second = pool.start(), pool.start()
            final = wait_job(
                c, job_id, lambda j: j["status"] in ("succeeded", "failed"), 400, "done"
            )
            assert final["status"] == "succeeded" and final["attempts"] == 1
            epochs = [m["epoch"] for m in c.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]
            assert epochs == [0, 1, 2, 3, 4, 5, 6]
        logs = first.log.read_text() + second.log.read_text()
        assert logs.count("Task finetune.train_job[") >= 2, "the broker never redelivered"
        assert f"job {job_id} not claimed (status running)" in logs
    finally:
        pool.stop_all()


def test_an_unreachable_object_store_is_retried_not_failed(
    client, workers, small_digits, fault_env
):
    """A worker that cannot reach the store hands the job back (transient failure) instead
    of failing it; once the store is reachable again the job completes, with one model."""
    from tests.conftest import free_port

    job_id = submit(client, small_digits, epochs=1)
    good_env = workers.env
    workers.env = {
        **good_env,
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    }  # nothing there
    broken = workers.start()
    retried = wait_job(
        client,
        job_id,
        lambda j: j["status"] == "interrupted" and j["attempts"] == 1,
        120,
        "the job handed back",
    )
    wait_for(lambda: b"transient failure" in broken.log.read_bytes(), 30, "the retry logged")
    broken.send_signal(signal.SIGKILL)  # it may hold the delayed retry message: the reaper resends
    broken.wait()
    assert retried["error"] is None
    workers.env = good_env
    workers.start()
    final = wait_job(client, job_id, lambda j: j["status"] in ("succeeded", "failed"), 240, "done")
    assert final["status"] == "succeeded", final["error"]
    assert final["attempts"] == 2 and get_model(client, job_id).status_code == 200


class RedisServer:
    """A private redis-server on its own port, so it can be killed and restarted without
    touching the Redis the rest of the suite uses."""

    def __init__(self, tmp_path):
        from tests.conftest import free_port

        self.port, self.dir, self.proc = free_port(), tmp_path, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

        def up():
            try:
                return redis.Redis.from_url(self.url).ping()
            except redis.ConnectionError:
                return False

        wait_for(up, 20, "redis-server up")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)  # everything in it is gone, unacked task included
        self.proc.wait()


def _app_client(env):
    from core.settings import Settings, get_settings
    from service.main import create_app

    settings = Settings(**{k.lower(): v for k, v in env.items()})
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app)


def _model_keys(env, job_id):
    return [
        o["Key"]
        for o in s3_client(env)
        .list_objects_v2(Bucket=env["S3_BUCKET"], Prefix=f"jobs/{job_id}/")
        .get("Contents", [])
    ]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_a_redis_restart_mid_job_neither_loses_nor_repeats_it(fault_env, small_digits, tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    env = {**fault_env, "BROKER_URL": server.url}
    pool = Workers(env, tmp_path)
    try:
        with _app_client(env) as c:
            job_id = submit(c, small_digits, epochs=3)
            worker = pool.start()
            wait_job(
                c,
                job_id,
                lambda j: (j["latest_metrics"] or {}).get("epoch", 0) >= 1,
                240,
                "a fine-tuning epoch",
            )
            server.kill()
            time.sleep(2)
            server.start()
            final = wait_job(
                c, job_id, lambda j: j["status"] in ("succeeded", "failed"), 300, "done"
            )
            assert final["status"] == "succeeded", final["error"]
            assert final["attempts"] == 1  # it was not run again
            epochs = [m["epoch"] for m in c.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]
            assert epochs == [0, 1, 2, 3]
            assert sum(k.endswith("model.safetensors") for k in _model_keys(env, job_id)) == 1
            # The worker saw the broker go, reconnected to the new one and takes the next job.
            assert worker.poll() is None
            nxt = submit(c, small_digits, epochs=1, strategy="linear_probe")
            done = wait_job(
                c, nxt, lambda j: j["status"] in ("succeeded", "failed"), 120, "next job"
            )
            assert done["status"] == "succeeded" and done["attempts"] == 1
            assert "Connection to broker lost" in worker.log.read_text()
    finally:
        pool.stop_all()
        server.kill()


def _checkpoint_gone(env, job_id):
    """The worker deletes the checkpoint right after recording success: wait for it."""

    def gone():
        keys = _model_keys(env, job_id)
        return keys if not any("/checkpoints/" in k for k in keys) else None

    return wait_for(gone, 30, "the checkpoint deleted")


def _proxied_store(fault_env):
    from urllib.parse import urlsplit

    from tests.netfaults import TcpProxy

    url = urlsplit(fault_env["S3_ENDPOINT_URL"])
    return TcpProxy(url.hostname, url.port)


def test_a_store_outage_during_a_checkpoint_write_is_retried(
    client, workers, small_digits, fault_env
):
    """The worker reaches S3 through a proxy that is cut while an epoch ends: the checkpoint
    write fails, is retried once the store is back, and the job ends with its one model."""
    proxy = _proxied_store(fault_env)
    workers.env = {**workers.env, "S3_ENDPOINT_URL": proxy.url}
    try:
        # The wait below ends with fine-tuning epoch 1's metrics (the probe's checkpoint is
        # already recorded), so epoch 1's or a later epoch's checkpoint write meets the
        # outage; four epochs leave room for it and for the retries.
        job_id = submit(client, small_digits, epochs=4)
        worker = workers.start()
        wait_checkpointed_epoch(client, job_id)
        proxy.set_mode("down")
        wait_for(lambda: b"checkpoint write 1/3" in worker.log.read_bytes(), 180, "a failed write")
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        proxy.set_mode("up")
        final = wait_job(
            client, job_id, lambda j: j["status"] in ("succeeded", "failed"), 300, "done"
        )
        assert final["status"] == "succeeded", final["error"]
        assert final["attempts"] == 1 and proxy.refused > 0
        log = worker.log.read_text()
        assert "checkpoint of epoch" not in log  # the retry wrote it: nothing was skipped
        epochs = [m["epoch"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]
        assert epochs == [0, 1, 2, 3, 4]
        keys = _checkpoint_gone(fault_env, job_id)
        assert sum(k.endswith("model.safetensors") for k in keys) == 1
        assert get_model(client, job_id).status_code == 200
    finally:
        proxy.close()


def test_a_job_stops_at_its_soft_time_limit_and_keeps_its_best_model(client, workers, small_digits):
    job_id = submit(client, small_digits, epochs=200, max_duration_seconds=15)
    workers.start()
    final = wait_job(
        client, job_id, lambda j: j["status"] in ("succeeded", "failed"), 240, "stopped"
    )
    assert final["status"] == "failed"
    assert final["error"]["code"] == "TIME_LIMIT_EXCEEDED"
    assert "time limit of 15s" in final["error"]["message"]
    assert final["progress"]["epoch"] < 200
    assert final["model_available"], final
    model = get_model(client, job_id, "metadata")
    assert model.status_code == 200
    assert model.json()["metrics"]["epoch"] == final["best_metrics"]["epoch"]


def test_a_hung_job_is_failed_and_its_worker_killed_at_the_hard_limit(
    client, workers, small_digits, fault_env
):
    """The worker's storage calls hang (the proxy accepts and never answers) while its
    heartbeat thread lives on: the job never reaches a step to notice its soft limit, so
    the hard limit (soft + JOB_STOP_GRACE_SECONDS) fails it and kills the process."""
    proxy = _proxied_store(fault_env)
    proxy.set_mode("hang")
    workers.env = {**workers.env, "S3_ENDPOINT_URL": proxy.url, "JOB_STOP_GRACE_SECONDS": "3"}
    try:
        job_id = submit(client, small_digits, epochs=1, max_duration_seconds=5)
        worker = workers.start()
        started = time.monotonic()
        assert worker.wait(timeout=120) == -signal.SIGKILL
        assert time.monotonic() - started < 60  # long before any S3 read timeout
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["error"]["code"] == "TIME_LIMIT_EXCEEDED"
        assert "stuck in phase 'preparing'" in job["error"]["message"]
        assert proxy.refused > 0
    finally:
        proxy.close()


@pytest.fixture()
def own_database(fault_env):
    """fault_env on a fresh, migrated database of its own: a reaper with a short resend
    period resends every long-queued job in its database, and the jobs that API-only tests
    leave queued in the shared one would be trained first by this test's worker."""
    import psycopg
    import redis

    from core.db import migrate
    from core.settings import Settings
    from tests.conftest import PG_ADMIN

    name = f"finetune_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {
        **fault_env,
        "DATABASE_URL": f"{fault_env['DATABASE_URL'].rsplit('/', 1)[0]}/{name}",
        "LIGHT_QUEUE": f"fault-light-{secrets.token_hex(4)}",  # light tasks of its own too
    }
    try:
        migrate(Settings(**{k.lower(): v for k, v in env.items()}))
        yield env
    finally:
        redis.Redis.from_url(env["BROKER_URL"]).delete(env["LIGHT_QUEUE"])
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_queued_job_whose_message_was_lost_is_sent_again(own_database, small_digits, tmp_path):
    """The broker loses a queued job's message (a Redis restart without persistence): the
    reaper sends it again after QUEUED_RESEND_SECONDS, and the job runs once."""
    import redis

    env = {**own_database, "QUEUED_RESEND_SECONDS": "3"}
    broker = redis.Redis.from_url(env["BROKER_URL"])
    pool = Workers(env, tmp_path)
    try:
        with _app_client(env) as c:
            job_id = submit(c, small_digits, epochs=1, strategy="linear_probe")
            sent = broker.lrange(env["TASK_QUEUE"], 0, -1)
            assert len([m for m in sent if job_id.encode() in m]) == 1
            broker.delete(env["TASK_QUEUE"])  # the message is gone
            wait_for(
                lambda: any(job_id.encode() in m for m in broker.lrange(env["TASK_QUEUE"], 0, -1)),
                30,
                "the task sent again",
            )
            time.sleep(1.5)
            # Once per period, not every round. (Only this job's messages count.)
            mine = [m for m in broker.lrange(env["TASK_QUEUE"], 0, -1) if job_id.encode() in m]
            assert len(mine) == 1
            assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
            pool.start()
            final = wait_job(
                c, job_id, lambda j: j["status"] in ("succeeded", "failed"), 180, "done"
            )
            assert final["status"] == "succeeded" and final["attempts"] == 1
    finally:
        pool.stop_all()

"""Live events and webhooks of a real job: the API and a worker as processes (with
WEBHOOK_ALLOW_PRIVATE, so they may post to this test's receiver on loopback), a receiver
that verifies every signature and fails the first tries, and the refusals without it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.webhooks import verify
from tests.conftest import REPO, free_port, wait_for
from tests.helpers import imagefolder_zip

pytestmark = pytest.mark.integration

FAIL_FIRST = {"/tenant": 2, "/always-500": 10**6}  # tries of each event answered 503/500


class Receiver(BaseHTTPRequestHandler):
    got: list[dict[str, Any]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        event_id = json.loads(body)["id"]
        with self.lock:
            seen = sum(
                1
                for g in self.got
                if g["path"] == self.path and json.loads(g["body"])["id"] == event_id
            )
            fail = seen < FAIL_FIRST.get(self.path, 0)
            status = (500 if self.path == "/always-500" else 503) if fail else 200
            self.got.append(
                {
                    "path": self.path,
                    "at": time.monotonic(),
                    "headers": dict(self.headers),
                    "body": body,
                    "status": status,
                }
            )
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def received(path: str, event: str | None = None, status: int | None = None) -> list[dict]:
    with Receiver.lock:
        return [
            g
            for g in Receiver.got
            if g["path"] == path
            and (event is None or json.loads(g["body"])["type"] == event)
            and (status is None or g["status"] == status)
        ]


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *cmd],
            env={**os.environ, **env},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def stack(integration_env, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The API and a worker on queues of their own, auth on, private webhooks allowed,
    quick retries (0.3 s, doubling, 4 tries) and quick event polls."""
    from core.db import session_scope
    from core.tenancy import create_key, create_tenant

    env = {
        **integration_env,
        "TASK_QUEUE": f"hooks-{secrets.token_hex(4)}",
        "LIGHT_QUEUE": f"hooks-light-{secrets.token_hex(4)}",
        "AUTH_ENABLED": "true",
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_BACKOFF_SECONDS": "0.3",
        "WEBHOOK_MAX_ATTEMPTS": "4",
        "EVENTS_POLL_SECONDS": "0.2",
    }
    logs = tmp_path_factory.mktemp("hooks-logs")
    port = free_port()
    api = spawn(["serve", "--no-worker", "--port", str(port)], env, logs / "api.log")
    worker = spawn(["worker"], env, logs / "worker.log")
    url = f"http://127.0.0.1:{port}"
    with session_scope() as s:
        tenant = create_tenant(s, f"hooks-{secrets.token_hex(4)}")
        _, token = create_key(s, tenant, ["read", "write"], "hooks test")
        s.commit()

    def api_ready() -> bool:
        assert api.poll() is None, api.log_path.read_text()[-3000:]  # type: ignore[attr-defined]
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(api_ready, 60, "API ready")
        wait_for(lambda: b"ready." in (logs / "worker.log").read_bytes(), 90, "worker ready")
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            yield {"client": client, "url": url, "headers": headers, "worker": worker}
    finally:
        stop(api)
        stop(worker)
        import redis

        redis.Redis.from_url(env["BROKER_URL"]).delete(env["TASK_QUEUE"], env["LIGHT_QUEUE"])


def read_events(client: httpx.Client, job_id: str, last: str | None = None) -> list[dict]:
    """Every event of one stream, until the server closes it."""
    headers = {"Last-Event-ID": last} if last is not None else {}
    events, current = [], {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=300) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events


@pytest.fixture(scope="module")
def run(stack, receiver) -> dict[str, Any]:
    """A tenant endpoint (failing its first two tries) and a job with its own webhook_url,
    trained to the end while its live events are read."""
    client = stack["client"]
    hook = client.post("/v1/webhooks", json={"url": f"{receiver}/tenant", "description": "ci"})
    assert hook.status_code == 201, hook.text
    ds = client.post(
        "/v1/datasets",
        files={"file": ("d.zip", imagefolder_zip({"a": 6, "b": 6}), "application/zip")},
    )
    assert ds.status_code == 201, ds.text
    spec = {"recipe": "manual", "strategy": "full", "epochs": 2, "image_size": 32}
    job = client.post(
        "/v1/jobs",
        json={"dataset_id": ds.json()["id"], **spec, "webhook_url": f"{receiver}/job"},
    )
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    events = read_events(client, job_id)
    assert events[-1]["event"] == "end", stack["worker"].log_path.read_text()[-3000:]
    for path in ("/tenant", "/job"):
        wait_for(lambda p=path: received(p, "job.succeeded", 200), 60, f"job.succeeded at {path}")
    return {
        "job_id": job_id,
        "events": events,
        "tenant_hook": hook.json(),
        "job_secret": job.json()["webhook_secret"],
        "dataset_id": ds.json()["id"],
    }


def test_the_event_stream_tells_status_progress_each_epoch_and_the_end(stack, run):
    events = run["events"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "status" and kinds[-1] == "end" and kinds.count("end") == 1
    assert {"status", "progress", "metrics"} <= set(kinds)
    assert events[-1]["data"]["status"] == "succeeded"
    metrics = [e for e in events if e["event"] == "metrics"]
    stored = stack["client"].get(f"/v1/jobs/{run['job_id']}/metrics").json()["data"]
    assert [m["data"]["epoch"] for m in metrics] == [m["epoch"] for m in stored]
    assert len(metrics) >= 2
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and ids[0] >= 0
    assert all(int(m["id"]) > 0 for m in metrics)
    statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
    assert statuses[0] in ("queued", "running") and statuses[-1] == "succeeded"


def test_a_reconnect_with_last_event_id_resumes_after_it(stack, run):
    metrics = [e for e in run["events"] if e["event"] == "metrics"]
    again = read_events(stack["client"], run["job_id"], last=metrics[0]["id"])
    kinds = [e["event"] for e in again]
    assert kinds[:2] == ["status", "progress"] and kinds[-1] == "end"
    resent = [e["data"] for e in again if e["event"] == "metrics"]
    assert resent == [m["data"] for m in metrics[1:]]  # only what came after
    final = read_events(stack["client"], run["job_id"], last=metrics[-1]["id"])
    assert [e["event"] for e in final] == ["status", "progress", "end"]
    replay = read_events(stack["client"], run["job_id"], last="not-ours")  # from the start
    assert [e["data"] for e in replay if e["event"] == "metrics"] == [m["data"] for m in metrics]


def test_every_delivery_is_signed_with_its_endpoints_secret(run):
    secrets_of = {"/tenant": run["tenant_hook"]["secret"], "/job": run["job_secret"]}
    for path, secret in secrets_of.items():
        posts = received(path)
        assert posts
        other = secrets_of["/job" if path == "/tenant" else "/tenant"]
        for p in posts:
            header = p["headers"]["Finetune-Signature"]
            assert verify(secret, header, p["body"]), (path, header)
            assert not verify(other, header, p["body"])
            event = json.loads(p["body"])
            assert p["headers"]["Finetune-Event"] == event["type"]
            assert p["headers"]["Finetune-Event-Id"] == event["id"]
            assert event["data"]["job"]["id"] == run["job_id"]
    events = {json.loads(p["body"])["type"] for p in received("/job", status=200)}
    assert events == {"job.running", "job.succeeded"}
    done = json.loads(received("/job", "job.succeeded")[0]["body"])["data"]["job"]
    assert done["status"] == "succeeded" and done["model_available"] is True


def test_failed_tries_are_retried_with_backoff_and_logged(stack, run):
    tries = received("/tenant", "job.running")
    assert [t["status"] for t in tries] == [503, 503, 200]
    gaps = [b["at"] - a["at"] for a, b in zip(tries, tries[1:], strict=False)]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5, gaps  # 0.3 s, then 0.6 s
    hook_id = run["tenant_hook"]["id"]
    log = stack["client"].get(f"/v1/webhooks/{hook_id}/deliveries").json()
    running = [d for d in log["data"] if d["event"] == "job.running"]
    assert len(running) == 1 and [t["status"] for t in received("/tenant", "job.succeeded")] == [
        503,
        503,
        200,
    ]
    assert running[0]["status"] == "succeeded" and running[0]["attempts"] == 3
    assert [t["status_code"] for t in running[0]["tries"]] == [503, 503, 200]
    assert running[0]["last_error"] is None and running[0]["delivered_at"]
    mine = stack["client"].get(f"/v1/jobs/{run['job_id']}/webhook-deliveries").json()
    assert mine["count"] == 4  # two events, two endpoints
    assert {d["status"] for d in mine["data"]} == {"succeeded"}
    assert "secret" not in stack["client"].get(f"/v1/webhooks/{hook_id}").json()
    listed = stack["client"].get("/v1/webhooks").json()
    assert [w["id"] for w in listed["data"]] == [hook_id] and "secret" not in listed["data"][0]


def test_a_delivery_can_be_sent_again_on_demand(stack, run):
    client = stack["client"]
    mine = client.get(f"/v1/jobs/{run['job_id']}/webhook-deliveries").json()["data"]
    (done,) = [
        d
        for d in mine
        if d["event"] == "job.succeeded" and d["webhook_id"] != run["tenant_hook"]["id"]
    ]
    before = len(received("/job", "job.succeeded"))
    resp = client.post(f"/v1/webhook-deliveries/{done['id']}/redeliver")
    assert resp.status_code == 202, resp.text
    wait_for(lambda: len(received("/job", "job.succeeded")) > before, 30, "the redelivery")
    again = received("/job", "job.succeeded")[-1]
    assert json.loads(again["body"])["id"] == done["event_id"]  # the same event
    assert verify(run["job_secret"], again["headers"]["Finetune-Signature"], again["body"])


def test_a_delivery_out_of_tries_fails_with_each_status_code(stack, run, receiver):
    client = stack["client"]
    job = client.post(
        "/v1/jobs",
        json={
            "dataset_id": run["dataset_id"],
            "epochs": 1,
            "webhook_url": f"{receiver}/always-500",
        },
    )
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202

    def canceled_delivery() -> dict | None:
        data = client.get(f"/v1/jobs/{job_id}/webhook-deliveries").json()["data"]
        found = [d for d in data if d["event"] == "job.canceled" and d["status"] == "failed"]
        return (
            [d for d in found if d["webhook_id"] != run["tenant_hook"]["id"]][0] if found else None
        )

    failed = wait_for(canceled_delivery, 60, "the delivery to fail")
    assert failed["attempts"] == 4 and failed["last_status_code"] == 500
    assert [t["status_code"] for t in failed["tries"]] == [500] * 4
    assert failed["last_error"] == "HTTP 500"
    resp = client.post(f"/v1/webhook-deliveries/{failed['id']}/redeliver")
    assert resp.status_code == 202 and resp.json()["status"] == "pending"
    assert resp.json()["attempts"] == 0 and len(resp.json()["tries"]) == 4  # history kept


def test_a_webhook_to_loopback_is_refused_unless_allowed(integration_env, receiver, run):
    """The same URLs the stack (WEBHOOK_ALLOW_PRIVATE=true) accepted, refused by an API
    and a worker with the default setting."""
    from fastapi.testclient import TestClient

    from core import webhook_store
    from core.db import session_scope
    from core.models import Job, WebhookDelivery, WebhookEndpoint, new_id
    from core.settings import Settings, get_settings
    from service.main import create_app
    from worker.webhooks import deliver

    settings = Settings(**{k.lower(): v for k, v in integration_env.items()})
    assert settings.webhook_allow_private is False
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as api:
        for url in (
            f"{receiver}/x",
            "http://localhost/x",
            "http://[::1]/x",
            "http://169.254.169.254/",
        ):
            resp = api.post("/v1/webhooks", json={"url": url})
            assert resp.status_code == 422, resp.text
            assert resp.json()["error_code"] == "WEBHOOK_URL_REFUSED"
            assert "WEBHOOK_ALLOW_PRIVATE" in resp.json()["detail"]
        jobs_before = api.get("/v1/jobs").json()["count"]
        ds = api.post(
            "/v1/datasets",
            files={"file": ("d.zip", imagefolder_zip({"a": 3, "b": 3}), "application/zip")},
        ).json()["id"]
        resp = api.post("/v1/jobs", json={"dataset_id": ds, "webhook_url": f"{receiver}/x"})
        assert resp.status_code == 422 and "127.0.0.1" in resp.json()["detail"]
        assert api.get("/v1/jobs").json()["count"] == jobs_before
        assert api.post("/v1/webhooks", json={"url": "ftp://example.com/"}).status_code == 422
    # Registered while allowed (or resolving elsewhere then): refused at delivery.
    with session_scope() as s:
        tenant_id = s.get(Job, run["job_id"]).tenant_id
        endpoint = WebhookEndpoint(
            id=new_id("whk"),
            tenant_id=tenant_id,
            url=f"{receiver}/rebound",
            secret="whsec_x",
            events=["job.succeeded"],
        )
        s.add(endpoint)
        s.commit()
        (delivery_id,) = webhook_store.emit(s, run["job_id"])
    try:
        assert deliver(delivery_id, settings) == "retrying"
        assert received("/rebound") == []
        with session_scope() as s:
            row = s.get(WebhookDelivery, delivery_id)
            assert row.attempts == 1 and row.last_status_code is None
            assert "127.0.0.1" in row.last_error and "WEBHOOK_ALLOW_PRIVATE" in row.last_error
    finally:
        with session_scope() as s:
            s.get(WebhookEndpoint, endpoint.id).deleted_at = s.get(Job, run["job_id"]).created_at
            s.commit()


def test_a_stream_sends_keep_alives_and_ends_at_its_maximum_duration(integration_env, monkeypatch):
    """A queued job nobody trains: no event after the first snapshot, so comments keep the
    connection; the stream closes after EVENTS_MAX_STREAM_SECONDS for the client to
    reconnect, without an `end`."""
    from fastapi.testclient import TestClient

    from core.settings import Settings, get_settings
    from service.main import create_app
    from service.routes import events

    monkeypatch.setattr(events, "KEEPALIVE_SECONDS", 0.3)
    env = {**integration_env, "TASK_QUEUE": f"idle-{secrets.token_hex(4)}"}
    settings = Settings(
        **{k.lower(): v for k, v in env.items()},
        events_poll_seconds=0.1,
        events_max_stream_seconds=1.5,
    )
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as api:
        ds = api.post(
            "/v1/datasets",
            files={"file": ("d.zip", imagefolder_zip({"a": 3, "b": 3}), "application/zip")},
        ).json()["id"]
        job_id = api.post("/v1/jobs", json={"dataset_id": ds, "epochs": 1}).json()["id"]
        started = time.monotonic()
        resp = api.get(f"/v1/jobs/{job_id}/events")
        took = time.monotonic() - started
    assert resp.status_code == 200 and 1.4 <= took < 10
    text = resp.text
    assert text.startswith("retry: 1000\n\n")
    assert text.count("event: status") == 1 and text.count("event: progress") == 1
    assert '"status": "queued"' in text and "event: end" not in text
    assert text.count(": keep-alive\n\n") >= 2


@pytest.fixture()
def pending_delivery(run, receiver) -> Iterator[str]:
    """A pending delivery of the trained job's success to a new endpoint (no task sent)."""
    from core import webhook_store
    from core.db import session_scope, utcnow
    from core.models import Job, WebhookEndpoint, new_id

    with session_scope() as s:
        endpoint = WebhookEndpoint(
            id=new_id("whk"),
            tenant_id=s.get(Job, run["job_id"]).tenant_id,
            url=f"{receiver}/unused",
            secret="whsec_x",
            events=["job.succeeded"],
        )
        s.add(endpoint)
        s.commit()
        (delivery_id,) = webhook_store.emit(s, run["job_id"])
        assert webhook_store.emit(s, run["job_id"]) == []  # announcing again adds nothing
    yield delivery_id
    with session_scope() as s:
        s.get(WebhookEndpoint, endpoint.id).deleted_at = utcnow()
        s.commit()


def test_only_one_of_eight_concurrent_claims_takes_a_try(pending_delivery):
    from core import webhook_store
    from core.db import session_scope
    from core.settings import get_settings

    wins, barrier = [], threading.Barrier(8)

    def contender(i: int) -> None:
        barrier.wait()
        with session_scope() as s:
            if webhook_store.claim(s, pending_delivery, get_settings()):
                wins.append(i)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_tries_back_off_then_fail_once_spent(pending_delivery):
    from core import webhook_store
    from core.db import session_scope, utcnow
    from core.models import WebhookDelivery
    from core.settings import get_settings

    settings = get_settings().model_copy(
        update={"webhook_max_attempts": 3, "webhook_backoff_seconds": 10.0}
    )
    waits = []
    with session_scope() as s:
        for code in (500, 502, 503):
            waits.append(webhook_store.record(s, pending_delivery, settings, code, f"HTTP {code}"))
            row = s.get(WebhookDelivery, pending_delivery, populate_existing=True)
            if waits[-1] is not None:  # not due before its backoff: a duplicate task skips it
                assert row.next_attempt_at > utcnow()
                assert not webhook_store.claim(s, pending_delivery, settings)
        assert waits == [10.0, 20.0, None]
        row = s.get(WebhookDelivery, pending_delivery, populate_existing=True)
        assert row.status == "failed" and row.attempts == 3 and row.next_attempt_at is None
        assert [t["status_code"] for t in row.attempt_log] == [500, 502, 503]
        assert webhook_store.record(s, pending_delivery, settings, 200, None) is None  # ended
        assert s.get(WebhookDelivery, pending_delivery, populate_existing=True).attempts == 3


def test_a_stream_stops_polling_when_its_client_disconnects(integration_env, monkeypatch):
    import uvicorn

    from core.settings import Settings, get_settings
    from service.main import create_app
    from service.routes import events

    polls: list[float] = []
    real_poll = events.poll
    monkeypatch.setattr(
        events, "poll", lambda *a: (polls.append(time.monotonic()), real_poll(*a))[1]
    )
    env = {**integration_env, "TASK_QUEUE": f"idle-{secrets.token_hex(4)}"}
    settings = Settings(**{k.lower(): v for k, v in env.items()}, events_poll_seconds=0.05)
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.started, 30, "uvicorn")
        files = {"file": ("d.zip", imagefolder_zip({"a": 3, "b": 3}), "application/zip")}
        ds = httpx.post(f"{url}/v1/datasets", files=files).json()["id"]
        job = httpx.post(f"{url}/v1/jobs", json={"dataset_id": ds, "epochs": 1}).json()["id"]
        with httpx.stream("GET", f"{url}/v1/jobs/{job}/events") as r:
            for chunk in r.iter_text():
                if "event: status" in chunk:
                    break
        time.sleep(2.0)  # a poll may be under way as the client leaves (a busy runner: slow)
        after = len(polls)
        time.sleep(1.0)  # 20 poll periods
        assert len(polls) == after
    finally:
        server.should_exit = True


def test_ends_outside_a_worker_are_announced_too(api):
    """A queued job canceled by the API, and a job the reaper fails (its worker is gone):
    each gets its delivery (a public address literal; nobody reads this light queue)."""
    from datetime import timedelta

    from sqlalchemy import update

    from core import transitions
    from core.db import session_scope, utcnow
    from core.models import Job
    from core.reaper import reap_once
    from core.settings import get_settings

    files = {"file": ("d.zip", imagefolder_zip({"a": 3, "b": 3}), "application/zip")}
    ds = api.post("/v1/datasets", files=files).json()["id"]
    body = {"dataset_id": ds, "epochs": 1, "webhook_url": "https://93.184.215.14/hook"}
    created = [api.post("/v1/jobs", json=body).json() for _ in range(2)]
    assert all(c["webhook_secret"].startswith("whsec_") for c in created)
    canceled, lost = (c["id"] for c in created)
    assert "webhook_secret" not in api.get(f"/v1/jobs/{canceled}").json()
    assert api.post(f"/v1/jobs/{canceled}/cancel").json()["status"] == "canceled"
    settings = get_settings()
    with session_scope() as s:
        assert transitions.claim(s, lost, "dead-worker")
        long_ago = utcnow() - timedelta(seconds=settings.stale_after_seconds + 60)
        s.execute(
            update(Job)
            .where(Job.id == lost)
            .values(attempts=settings.max_attempts, heartbeat_at=long_ago)
        )
        s.commit()
    assert lost in reap_once(settings)[1]
    # Other tests may leave tenant-wide endpoints on this tenant: only the job's own counts.
    tenant_wide = {w["id"] for w in api.get("/v1/webhooks").json()["data"]}
    for job_id, event in ((canceled, "job.canceled"), (lost, "job.failed")):
        deliveries = api.get(f"/v1/jobs/{job_id}/webhook-deliveries").json()["data"]
        (delivery,) = [d for d in deliveries if d["webhook_id"] not in tenant_wide]
        assert delivery["event"] == event and delivery["status"] == "pending"
        assert delivery["payload"]["data"]["job"]["status"] == event.removeprefix("job.")
    error = delivery["payload"]["data"]["job"]["error"]
    assert error["code"] == "WORKER_LOST"

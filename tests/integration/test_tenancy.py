"""Tenants and limits, with auth on, against real PostgreSQL, Redis and S3: API keys and
scopes (a tenant's `admin` bounded to its tenant, the `operator` over all of them),
isolation across every route, each per-tenant limit, presigned downloads, CORS, body
limits, the audit log and what /readyz tells anyone."""

from __future__ import annotations

import secrets
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient

from core import transitions, webhook_store
from core.db import session_scope
from core.models import DEFAULT_TENANT, Tenant
from core.tenancy import create_key
from tests.conftest import REPO
from tests.helpers import imagefolder_zip, s3_client

pytestmark = pytest.mark.integration

ZIP = imagefolder_zip({"cat": 3, "dog": 3})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_app(env: dict[str, str], **overrides: object):
    from core.settings import Settings, get_settings
    from service.main import create_app

    settings = Settings(**{k.lower(): v for k, v in {**env, **overrides}.items()})
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return app, settings


@pytest.fixture(scope="module")
def env(integration_env):
    """Auth on, the service's default limits, a queue no worker reads."""
    env = {
        **integration_env,
        "AUTH_ENABLED": "true",
        "TASK_QUEUE": f"tenancy-{secrets.token_hex(4)}",
        "TENANT_MAX_RUNNING_JOBS": "2",
        "TENANT_MAX_QUEUED_JOBS": "20",
        "RATE_LIMIT_PER_MINUTE": "100000",
    }
    yield env
    import redis

    redis.Redis.from_url(env["BROKER_URL"]).delete(env["TASK_QUEUE"])


@pytest.fixture(scope="module")
def client(env):
    app, _ = make_app(env)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def operator_token(env):
    """What `finetune keys create --tenant default --scopes read,write,admin,operator` makes."""
    with session_scope() as s:
        tenant = s.get(Tenant, DEFAULT_TENANT)
        _, token = create_key(s, tenant, ["read", "write", "admin", "operator"], "test operator")
        s.commit()
    return token


def new_tenant(client, operator_token, **limits) -> tuple[str, str]:
    """(tenant id, a read+write key), made through the admin API by the operator."""
    name = f"t-{secrets.token_hex(4)}"
    resp = client.post(
        "/v1/admin/tenants", json={"name": name, **limits}, headers=bearer(operator_token)
    )
    assert resp.status_code == 201, resp.text
    tenant_id = resp.json()["id"]
    key = client.post(
        "/v1/admin/keys",
        json={"tenant": name, "scopes": ["read", "write"]},
        headers=bearer(operator_token),
    )
    assert key.status_code == 201, key.text
    assert key.json()["key"].startswith("ft_") and key.json()["tenant_id"] == tenant_id
    return tenant_id, key.json()["key"]


def upload(client, token, data=ZIP, name="pets"):
    return client.post(
        "/v1/datasets",
        files={"file": ("d.zip", data, "application/zip")},
        data={"name": name},
        headers=bearer(token),
    )


def submit(client, token, dataset_id, **config):
    return client.post(
        "/v1/jobs",
        json={"dataset_id": dataset_id, "epochs": 1, "image_size": 32, **config},
        headers=bearer(token),
    )


def counted_body(mib):
    """A streamed request body of `mib` MiB, and the list that grows by one per MiB read."""
    sent = []

    def chunks():
        for _ in range(mib):
            sent.append(1)
            yield b"x" * (1024 * 1024)

    return sent, chunks()


# --- authentication ---------------------------------------------------------------------


def test_missing_malformed_unknown_and_revoked_keys_get_401(client, operator_token):
    _, token = new_tenant(client, operator_token)
    key_id = token.split("_")[1]
    assert client.get("/v1/me", headers=bearer(token)).status_code == 200
    revoke = client.delete(f"/v1/admin/keys/{key_id}", headers=bearer(operator_token))
    assert revoke.status_code == 204
    wrong_secret = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
    cases = {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {token}"},
        "empty bearer": {"Authorization": "Bearer "},
        "malformed": bearer("not-a-key"),
        "unknown": bearer(f"ft_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"),
        "wrong secret": bearer(wrong_secret),
        "revoked": bearer(token),
    }
    for what, headers in cases.items():
        for method, path in [
            ("GET", "/v1/me"),
            ("GET", "/v1/datasets"),
            ("GET", "/v1/jobs/job_x"),
            ("POST", "/v1/jobs"),
            ("GET", "/v1/backbones"),
            ("GET", "/v1/admin/keys"),
        ]:
            resp = client.request(method, path, headers=headers, json={})
            assert resp.status_code == 401, (what, path, resp.text)
            assert resp.json()["error_code"] == "UNAUTHENTICATED"
            assert resp.headers["www-authenticate"].startswith("Bearer")
    assert "revoked" in client.get("/v1/me", headers=bearer(token)).json()["detail"]
    # Health checks stay open for load balancers.
    assert client.get("/healthz").status_code == 200


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(client):
    sent, body = counted_body(64)
    resp = client.post(
        "/v1/datasets",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=B"},
    )
    assert resp.status_code == 401
    assert len(sent) <= 2, f"{len(sent)} MiB were read before refusing"


def test_scopes_are_enforced(client, operator_token, env):
    _, rw = new_tenant(client, operator_token)
    ds = upload(client, rw).json()["id"]
    tenant_id = client.get("/v1/me", headers=bearer(rw)).json()["tenant_id"]
    with session_scope() as s:
        tenant = s.get(Tenant, tenant_id)
        _, read_only = create_key(s, tenant, ["read"], "viewer")
        s.commit()
    assert client.get(f"/v1/datasets/{ds}", headers=bearer(read_only)).status_code == 200
    for method, path, body in [
        ("POST", "/v1/jobs", {"dataset_id": ds}),
        ("DELETE", f"/v1/datasets/{ds}", None),
        ("POST", "/v1/jobs/job_x/cancel", None),
    ]:
        resp = client.request(method, path, json=body, headers=bearer(read_only))
        assert resp.status_code == 403, (path, resp.text)
        assert resp.json()["error_code"] == "INSUFFICIENT_SCOPE"
        assert "'write'" in resp.json()["detail"]
    for path in ("/v1/admin/keys", "/v1/admin/tenants", "/v1/admin/audit"):
        resp = client.get(path, headers=bearer(rw))
        assert resp.status_code == 403 and resp.json()["error_code"] == "INSUFFICIENT_SCOPE"


# --- isolation --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_tenants(client, operator_token, env):
    """Tenant B with a dataset, a finished job with a stored model, and a running job;
    tenant A with nothing of B's."""
    _, key_a = new_tenant(client, operator_token)
    tenant_b, key_b = new_tenant(client, operator_token)
    ds = upload(client, key_b, name="b-secret-name").json()
    finished = submit(client, key_b, ds["id"]).json()["id"]
    running = submit(client, key_b, ds["id"]).json()["id"]
    s3 = s3_client(env)
    keys = {}
    for name in ("model.zip", "model.safetensors", "model.torchscript.pt", "metadata.json"):
        keys[name] = f"jobs/{finished}/model/{name}"
        s3.put_object(Bucket=env["S3_BUCKET"], Key=keys[name], Body=f"{name} of B".encode())
    with session_scope() as s:
        assert transitions.claim(s, finished, "w-b")
        assert transitions.succeed(
            s,
            finished,
            "w-b",
            {
                "bundle_key": keys["model.zip"],
                "safetensors_key": keys["model.safetensors"],
                "torchscript_key": keys["model.torchscript.pt"],
                "metadata_key": keys["metadata.json"],
                "report": {"validation": {}},
                "classes": ["cat", "dog"],
            },
        )
        assert transitions.claim(s, running, "w-b2")
    (model,) = client.get("/v1/models", headers=bearer(key_b)).json()["data"]
    # A public address literal: accepted without DNS; no worker reads this queue.
    hook = client.post(
        "/v1/webhooks", json={"url": "https://93.184.215.14/b"}, headers=bearer(key_b)
    )
    assert hook.status_code == 201, hook.text
    with session_scope() as s:
        (delivery,) = webhook_store.emit(s, finished)  # its job.succeeded, for B's endpoint
    return {
        "a": key_a,
        "b": key_b,
        "tenant_b": tenant_b,
        "ds": ds["id"],
        "job": finished,
        "running": running,
        "model": model["id"],  # its registry entry (core/registry.py)
        "webhook": hook.json()["id"],
        "delivery": delivery,
    }


# Every /v1 route that names an object; the test below fails when a new one is not listed.
MATRIX = [
    ("GET", "/v1/datasets/{dataset_id}", None),
    ("GET", "/v1/datasets/{dataset_id}/samples.png", None),
    ("GET", "/v1/datasets/{dataset_id}/augmentations/preview", None),
    ("DELETE", "/v1/datasets/{dataset_id}", None),
    ("GET", "/v1/jobs/{job_id}", None),
    ("GET", "/v1/jobs/{job_id}/metrics", None),
    ("GET", "/v1/jobs/{job_id}/model", None),
    ("GET", "/v1/jobs/{job_id}/model/link", None),
    ("GET", "/v1/jobs/{job_id}/report", None),
    ("GET", "/v1/jobs/{job_id}/plots/{name}.png", None),
    ("GET", "/v1/jobs/{job_id}/label-issues", None),
    ("POST", "/v1/jobs/{job_id}/cancel", {"mode": "discard"}),
    ("POST", "/v1/jobs/{job_id}/explain", None),
    ("GET", "/v1/jobs/{job_id}/explanations/{explanation_id}", None),
    ("GET", "/v1/jobs/{job_id}/explanations/{explanation_id}.png", None),
    ("GET", "/v1/models/{ref}", None),
    ("PATCH", "/v1/models/{ref}", {"stage": "archived"}),
    ("GET", "/v1/models/{ref}/download", None),
    ("POST", "/v1/jobs/{job_id}/predict", None),
    ("POST", "/v1/models/{ref}/predict", None),
    ("POST", "/v1/models/{ref}/explain", None),
    ("GET", "/v1/jobs/{job_id}/events", None),
    ("GET", "/v1/jobs/{job_id}/webhook-deliveries", None),
    ("GET", "/v1/webhooks/{webhook_id}", None),
    ("DELETE", "/v1/webhooks/{webhook_id}", None),
    ("GET", "/v1/webhooks/{webhook_id}/deliveries", None),
    ("POST", "/v1/webhook-deliveries/{delivery_id}/redeliver", None),
]


def test_the_matrix_covers_every_route_with_an_object_id(client):
    routes = {
        (method.upper(), path)
        for path, ops in client.app.openapi()["paths"].items()
        if path.startswith("/v1/") and "{" in path and "/admin/" not in path
        for method in ops
    }
    assert routes == {(m, p) for m, p, _ in MATRIX}


@pytest.mark.parametrize("method, template, body", MATRIX)
def test_another_tenants_objects_answer_404_on_every_route(
    client, two_tenants, method, template, body
):
    t = two_tenants
    job = t["running"] if template.endswith("/cancel") else t["job"]
    path = template.format(
        dataset_id=t["ds"],
        job_id=job,
        name="curves",
        ref=t["model"],
        explanation_id="0" * 32,
        webhook_id=t["webhook"],
        delivery_id=t["delivery"],
    )
    resp = client.request(method, path, json=body, headers=bearer(t["a"]))
    assert resp.status_code == 404, resp.text
    assert resp.json()["error_code"] in (
        "DATASET_NOT_FOUND",
        "JOB_NOT_FOUND",
        "MODEL_NOT_FOUND",
        "WEBHOOK_NOT_FOUND",
        "DELIVERY_NOT_FOUND",
    )
    assert "b-secret-name" not in resp.text and "location" not in resp.headers
    if method == "GET":  # the owner is answered (a 404 for the plot not drawn is its own code)
        own = client.get(path, headers=bearer(t["b"]), follow_redirects=False)
        # 202: a preview being rendered
        assert own.status_code in (200, 202, 307, 409) or (
            own.status_code == 404
            and own.json()["error_code"] in ("PLOT_NOT_AVAILABLE", "EXPLANATION_NOT_FOUND")
        ), (path, own.text)


def test_another_tenants_objects_are_absent_from_lists_and_unusable(client, two_tenants):
    t = two_tenants
    a = bearer(t["a"])
    assert t["ds"] not in client.get("/v1/datasets", headers=a).text
    jobs = client.get("/v1/jobs", headers=a).json()
    assert t["job"] not in str(jobs) and t["running"] not in str(jobs)
    assert client.get("/v1/jobs", params={"dataset_id": t["ds"]}, headers=a).json()["count"] == 0
    resp = submit(client, t["a"], t["ds"])
    assert resp.status_code == 404 and resp.json()["error_code"] == "DATASET_NOT_FOUND"
    # B still sees its own.
    b = bearer(t["b"])
    assert client.get("/v1/jobs", params={"dataset_id": t["ds"]}, headers=b).json()["count"] == 2
    # The dataset and job were not touched by A's attempts (delete, cancel).
    assert client.get(f"/v1/datasets/{t['ds']}", headers=b).status_code == 200
    assert client.get(f"/v1/jobs/{t['running']}", headers=b).json()["cancel_requested"] is False


def test_model_downloads_are_presigned_urls_issued_after_the_ownership_check(
    client, two_tenants, env
):
    t = two_tenants
    resp = client.get(
        f"/v1/jobs/{t['job']}/model",
        params={"format": "safetensors"},
        headers=bearer(t["b"]),
        follow_redirects=False,
    )
    assert resp.status_code == 307
    url = resp.headers["location"]
    assert url.startswith(env["S3_ENDPOINT_URL"])
    assert "X-Amz-Expires=300" in url  # DOWNLOAD_URL_TTL_SECONDS
    got = httpx.get(url)  # no API key: the signature is the credential
    assert got.status_code == 200 and got.content == b"model.safetensors of B"
    assert f"{t['job']}-model.safetensors" in got.headers["content-disposition"]
    # Signed for this one object (moto does not check signatures; S3 and MinIO do).
    assert "X-Amz-Signature=" in url and "X-Amz-SignedHeaders=host" in url


# --- limits -----------------------------------------------------------------------------


def test_the_queued_jobs_limit_is_a_429_naming_it(client, operator_token):
    _, key = new_tenant(client, operator_token, max_queued_jobs=2)
    ds = upload(client, key).json()["id"]
    assert submit(client, key, ds).status_code == 201
    assert submit(client, key, ds).status_code == 201
    resp = submit(client, key, ds)
    assert resp.status_code == 429
    assert resp.json()["error_code"] == "QUEUED_JOBS_LIMIT" and "max_queued_jobs" in resp.text
    assert resp.headers["retry-after"]


def test_the_storage_limit_is_a_403_before_and_after_the_upload_is_read(client, operator_token):
    # What ZIP takes in the store (its canonical archive, index and thumbnails) is charged.
    _, probe = new_tenant(client, operator_token)
    assert upload(client, probe).status_code == 201
    stored = client.get("/v1/me", headers=bearer(probe)).json()["usage"]["storage_bytes"]
    assert stored > len(ZIP)
    _, key = new_tenant(client, operator_token, max_storage_bytes=stored + 100)
    assert upload(client, key).status_code == 201
    # Once the upload is read, its exact size is checked: nothing more is stored.
    resp = upload(client, key)
    assert resp.status_code == 403
    assert resp.json()["error_code"] == "STORAGE_LIMIT" and "max_storage_bytes" in resp.text
    me = client.get("/v1/me", headers=bearer(key)).json()
    assert me["usage"]["storage_bytes"] == stored
    assert client.get("/v1/datasets", headers=bearer(key)).json()["count"] == 1
    # An upload whose Content-Length cannot fit is refused before its body is read.
    sent, body = counted_body(10)
    resp = client.post(
        "/v1/datasets",
        content=body,
        headers={
            **bearer(key),
            "Content-Type": "multipart/form-data; boundary=B",
            "Content-Length": str(10 * 1024 * 1024),
        },
    )
    assert resp.status_code == 403 and resp.json()["error_code"] == "STORAGE_LIMIT"
    assert len(sent) <= 1


def test_the_job_duration_limit_is_a_403_and_the_default(client, operator_token):
    _, key = new_tenant(client, operator_token, max_job_duration_seconds=60)
    ds = upload(client, key).json()["id"]
    resp = submit(client, key, ds, max_duration_seconds=120)
    assert resp.status_code == 403
    assert resp.json()["error_code"] == "JOB_DURATION_LIMIT" and "60s" in resp.text
    ok = submit(client, key, ds)
    assert ok.status_code == 201 and ok.json()["config"]["max_duration_seconds"] == 60


def test_the_running_jobs_limit_holds_a_job_back_until_a_slot_frees(client, operator_token, env):
    from core.settings import Settings
    from worker.tasks import run_job

    settings = Settings(**{k.lower(): v for k, v in env.items()})
    tenant_id, key = new_tenant(client, operator_token, max_running_jobs=1)
    ds = upload(client, key).json()["id"]
    first = submit(client, key, ds).json()["id"]
    second = submit(client, key, ds).json()["id"]
    with session_scope() as s:
        assert transitions.claim(s, first, "busy-worker")
    # The worker that gets the second job's task does not train it: it waits for a slot.
    assert run_job(second, settings, worker_id="w2") == "deferred"
    job = client.get(f"/v1/jobs/{second}", headers=bearer(key)).json()
    assert job["status"] == "queued" and job["progress"]["phase"] == "waiting_for_slot"
    assert job["attempts"] == 0
    import redis

    queued = redis.Redis.from_url(env["BROKER_URL"]).lrange(env["TASK_QUEUE"], 0, -1)
    assert sum(second.encode() in m for m in queued) == 2  # submitted, then sent again
    # Once the first one ends, the slot is free.
    with session_scope() as s:
        assert transitions.fail(
            s, first, code="TRAINING_FAILED", message="x", worker_id="busy-worker"
        )
        outcome, limit = transitions.claim_within_limit(s, second, "w3", settings)
    assert (outcome, limit) == ("claimed", 1)


def test_the_rate_limit_is_a_429_per_tenant(client, operator_token):
    _, slow = new_tenant(client, operator_token, rate_limit_per_minute=5)
    _, other = new_tenant(client, operator_token)
    codes = [client.get("/v1/me", headers=bearer(slow)).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    resp = client.get("/v1/datasets", headers=bearer(slow))
    assert resp.json()["error_code"] == "RATE_LIMITED" and int(resp.headers["retry-after"]) >= 1
    assert client.get("/v1/me", headers=bearer(other)).status_code == 200  # not shared


def test_json_bodies_are_limited_before_they_are_read(client, operator_token):
    _, key = new_tenant(client, operator_token)
    resp = client.post(
        "/v1/jobs",
        content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    assert resp.status_code == 413 and "MAX_JSON_BODY_BYTES" in resp.json()["detail"]


# --- admin, audit, CORS, CLI -----------------------------------------------------------


def test_the_operator_manages_tenants_and_keys_and_everything_is_audited(
    client, operator_token, two_tenants
):
    t = two_tenants
    op = bearer(operator_token)
    dup = client.post("/v1/admin/tenants", json={"name": "default"}, headers=op)
    assert dup.status_code == 409 and dup.json()["error_code"] == "TENANT_EXISTS"
    patched = client.patch(
        f"/v1/admin/tenants/{t['tenant_b']}", json={"max_running_jobs": 7}, headers=op
    )
    assert patched.status_code == 200 and patched.json()["limits"]["max_running_jobs"] == 7
    keys = client.get("/v1/admin/keys", params={"tenant": t["tenant_b"]}, headers=op).json()
    assert keys["count"] == 1 and "key" not in keys["data"][0]  # never shown again
    assert "key_hash" not in str(keys)
    # B downloads, cancels, deletes; A tries and fails: only B's actions are B's audit.
    client.get(f"/v1/jobs/{t['job']}/model", headers=bearer(t["b"]), follow_redirects=False)
    client.get(f"/v1/jobs/{t['job']}/model", headers=bearer(t["a"]), follow_redirects=False)
    assert client.post(f"/v1/jobs/{t['running']}/cancel", headers=bearer(t["b"])).status_code == 202
    spare = upload(client, t["b"], name="spare").json()["id"]
    assert client.delete(f"/v1/datasets/{spare}", headers=bearer(t["b"])).status_code == 204
    events = client.get(
        "/v1/admin/audit", params={"tenant": t["tenant_b"], "limit": 100}, headers=op
    ).json()["data"]
    actions = {e["action"] for e in events}
    assert {
        "key.create",
        "dataset.create",
        "job.create",
        "model.download",
        "tenant.update",
    } <= actions
    download = next(e for e in events if e["action"] == "model.download")
    assert download["object_id"] == t["job"] and download["key_id"] == t["b"].split("_")[1]
    assert download["detail"]["via"] == "presigned_url"
    assert sum(e["action"] == "model.download" for e in events) >= 1
    tenant_a = client.get("/v1/me", headers=bearer(t["a"])).json()["tenant_id"]
    a_events = client.get("/v1/admin/audit", params={"tenant": tenant_a}, headers=op).json()
    assert all(e["action"] != "model.download" for e in a_events["data"])  # refused: none


def tenant_admin(client, operator_token, scopes=("read", "write", "admin")) -> dict[str, str]:
    """A new tenant with a key of `scopes`, given by the operator: its id, name and token."""
    tenant_id, _ = new_tenant(client, operator_token)
    made = client.post(
        "/v1/admin/keys",
        json={"tenant": tenant_id, "scopes": list(scopes)},
        headers=bearer(operator_token),
    )
    assert made.status_code == 201, made.text
    me = client.get("/v1/me", headers=bearer(made.json()["key"])).json()
    return {"id": tenant_id, "name": me["tenant_name"], "token": made.json()["key"]}


def refused(resp, code="INSUFFICIENT_SCOPE", status=403) -> bool:
    return resp.status_code == status and resp.json()["error_code"] == code


def test_a_tenant_admin_administers_its_own_tenant_and_no_other(client, operator_token):
    mine = tenant_admin(client, operator_token)
    other = tenant_admin(client, operator_token)
    adm = bearer(mine["token"])
    # Its own tenant's view, keys and audit log, and nobody else's.
    tenants = client.get("/v1/admin/tenants", headers=adm).json()
    assert [t["id"] for t in tenants["data"]] == [mine["id"]] and tenants["count"] == 1
    keys = client.get("/v1/admin/keys", headers=adm).json()
    assert keys["count"] == 2 and {k["tenant_id"] for k in keys["data"]} == {mine["id"]}
    by_name = client.get("/v1/admin/keys", params={"tenant": mine["name"]}, headers=adm).json()
    assert by_name["count"] == 2
    events = client.get("/v1/admin/audit", headers=adm).json()
    assert events["count"] >= 2 and {e["tenant_id"] for e in events["data"]} == {mine["id"]}
    # Another tenant, existing or not, is refused alike: nothing says whether it exists.
    for ref in (other["id"], other["name"], "default", "no-such-tenant"):
        for path in ("/v1/admin/keys", "/v1/admin/audit"):
            resp = client.get(path, params={"tenant": ref}, headers=adm)
            assert refused(resp) and "'operator'" in resp.json()["detail"], (path, ref)
        made = client.post("/v1/admin/keys", json={"tenant": ref, "scopes": ["admin"]}, headers=adm)
        assert refused(made), (ref, made.text)
    # No tenant changes at all, not even of its own.
    assert refused(client.post("/v1/admin/tenants", json={"name": "mine-too"}, headers=adm))
    for ref in (mine["id"], other["id"], "default"):
        resp = client.patch(f"/v1/admin/tenants/{ref}", json={"max_queued_jobs": 9}, headers=adm)
        assert refused(resp)
        assert refused(client.delete(f"/v1/admin/tenants/{ref}", headers=adm))
    me = client.get("/v1/me", headers=adm).json()
    assert me["limits"]["max_queued_jobs"] == 20  # unchanged: the service's default
    # Another tenant's key is as absent as a missing one, and keeps working.
    other_key = other["token"].split("_")[1]
    assert refused(client.delete(f"/v1/admin/keys/{other_key}", headers=adm), "KEY_NOT_FOUND", 404)
    operator_key = operator_token.split("_")[1]
    assert refused(
        client.delete(f"/v1/admin/keys/{operator_key}", headers=adm), "KEY_NOT_FOUND", 404
    )
    assert client.get("/v1/me", headers=bearer(other["token"])).status_code == 200
    assert client.get("/v1/me", headers=bearer(operator_token)).status_code == 200
    # Within its tenant it makes and revokes keys.
    made = client.post(
        "/v1/admin/keys", json={"tenant": mine["name"], "scopes": ["read"]}, headers=adm
    )
    assert made.status_code == 201 and made.json()["tenant_id"] == mine["id"]
    assert client.delete(f"/v1/admin/keys/{made.json()['id']}", headers=adm).status_code == 204
    assert client.get("/v1/me", headers=bearer(made.json()["key"])).status_code == 401


def test_a_tenant_admin_grants_and_revokes_only_scopes_it_holds(client, operator_token):
    mine = tenant_admin(client, operator_token, scopes=("read", "admin"))
    adm = bearer(mine["token"])
    for scopes in (["write"], ["read", "write"], ["operator"]):
        resp = client.post(
            "/v1/admin/keys", json={"tenant": mine["id"], "scopes": scopes}, headers=adm
        )
        # (`operator` may also be refused by the request schema, before this rule.)
        assert resp.status_code in (403, 422) and resp.status_code != 201, (scopes, resp.text)
        if scopes != ["operator"]:
            assert refused(resp) and "write" in resp.json()["detail"]
    keys = client.get("/v1/admin/keys", headers=adm).json()
    assert keys["count"] == 2  # its read+write key and its own: nothing was made
    # A key of its tenant with more than it holds (made by the operator) stays out of reach.
    writer = client.post(
        "/v1/admin/keys",
        json={"tenant": mine["id"], "scopes": ["read", "write"]},
        headers=bearer(operator_token),
    ).json()
    assert refused(client.delete(f"/v1/admin/keys/{writer['id']}", headers=adm))
    assert client.get("/v1/me", headers=bearer(writer["key"])).status_code == 200
    # A default-tenant admin without `operator` is a tenant admin like any other.
    with session_scope() as s:
        _, plain = create_key(s, s.get(Tenant, DEFAULT_TENANT), ["read", "admin"], "plain")
        s.commit()
    assert client.get("/v1/admin/tenants", headers=bearer(plain)).json()["count"] == 1
    assert refused(
        client.get("/v1/admin/keys", params={"tenant": mine["id"]}, headers=bearer(plain))
    )
    operator_key = operator_token.split("_")[1]
    assert refused(client.delete(f"/v1/admin/keys/{operator_key}", headers=bearer(plain)))


def test_the_operator_scope_is_only_for_keys_of_the_default_tenant(client, operator_token):
    from core.tenancy import TenancyError

    mine = tenant_admin(client, operator_token)
    with session_scope() as s, pytest.raises(TenancyError, match="operator"):
        create_key(s, s.get(Tenant, mine["id"]), ["read", "operator"])
    resp = client.post(
        "/v1/admin/keys",
        json={"tenant": mine["id"], "scopes": ["operator"]},
        headers=bearer(operator_token),
    )
    assert resp.status_code == 422, resp.text
    # The operator administers every tenant: its list, its keys, its audit log.
    tenants = client.get("/v1/admin/tenants", headers=bearer(operator_token)).json()
    assert tenants["count"] >= 3 and mine["id"] in {t["id"] for t in tenants["data"]}
    keys = client.get("/v1/admin/keys", headers=bearer(operator_token)).json()
    assert len({k["tenant_id"] for k in keys["data"]}) >= 2


def test_upgrading_makes_the_default_tenants_admin_keys_operators_and_no_others():
    import json

    import psycopg
    from alembic import command
    from sqlalchemy import create_engine, text

    from core.db import alembic_config
    from tests.conftest import PG_ADMIN

    name = f"finetune_mig_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False
    engine = create_engine(url)
    keys = {
        "k_admin": ("default", ["read", "write", "admin"]),
        "k_reader": ("default", ["read"]),
        "k_tenant_admin": ("tn_x", ["read", "admin"]),
    }

    def scopes() -> dict[str, list[str]]:
        with engine.connect() as conn:
            return dict(conn.execute(text("SELECT id, scopes FROM api_keys")).all())

    try:
        command.upgrade(cfg, "0008")
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO tenants (id, name, created_at) VALUES ('tn_x', 'x', now())")
            )
            for key_id, (tenant, held) in keys.items():
                conn.execute(
                    text(
                        "INSERT INTO api_keys (id, tenant_id, name, key_hash, scopes, created_at)"
                        " VALUES (:id, :tenant, 'k', 'h', CAST(:scopes AS JSON), now())"
                    ),
                    {"id": key_id, "tenant": tenant, "scopes": json.dumps(held)},
                )
        command.upgrade(cfg, "head")
        assert scopes() == {
            "k_admin": ["read", "write", "admin", "operator"],
            "k_reader": ["read"],
            "k_tenant_admin": ["read", "admin"],
        }
        command.downgrade(cfg, "0008")
        assert scopes() == {k: held for k, (_, held) in keys.items()}
    finally:
        engine.dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_readiness_says_what_is_down_but_not_how(env, caplog):
    import socket

    def closed_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    ports = {name: closed_port() for name in ("db", "broker", "s3")}
    app, _ = make_app(
        env,
        DATABASE_URL=f"postgresql+psycopg://secret_user:pw@127.0.0.1:{ports['db']}/secret_db",
        BROKER_URL=f"redis://127.0.0.1:{ports['broker']}/0",
        S3_ENDPOINT_URL=f"http://127.0.0.1:{ports['s3']}",
    )
    caplog.set_level("WARNING")
    with TestClient(app) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 503
    assert resp.json() == {
        "status": "not ready",
        "checks": {
            "database": "error: unreachable",
            "broker": "error: unreachable",
            "storage": "error: unreachable",
        },
    }
    for port in ports.values():  # the detail is in the log, for the operator
        assert str(port) in caplog.text


def test_cors_is_off_by_default_and_an_allow_list_when_set(env):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    app, _ = make_app(env)
    with TestClient(app) as c:
        resp = c.options("/v1/datasets", headers=preflight)
        assert "access-control-allow-origin" not in resp.headers
    app, _ = make_app(env, CORS_ALLOW_ORIGINS=["https://app.example"])
    with TestClient(app) as c:
        ok = c.options("/v1/datasets", headers=preflight)
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        evil = c.options("/v1/datasets", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in evil.headers


@pytest.fixture
def uncached_client(env):
    """An API that looks every key up: the CLI is another process, and what it changes
    reaches a key cache within AUTH_CACHE_SECONDS (tests/integration/test_api_hot_path.py)."""
    app, _ = make_app(env, AUTH_CACHE_SECONDS="0")
    with TestClient(app) as c:
        yield c


def test_the_cli_creates_tenants_and_keys_that_work_and_revokes_them(uncached_client, env):
    import os

    client = uncached_client

    run_env = {**os.environ, **env}

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=run_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    name = f"cli-{secrets.token_hex(3)}"
    made = cli("tenants", "create", name, "--max-queued-jobs", "3")
    assert made.returncode == 0, made.stderr
    key = cli("keys", "create", "--tenant", name, "--scopes", "read")
    assert key.returncode == 0, key.stderr
    token = key.stdout.strip().rsplit(" ", 1)[-1]
    me = client.get("/v1/me", headers=bearer(token)).json()
    assert me["tenant_name"] == name and me["scopes"] == ["read"]
    assert me["limits"]["max_queued_jobs"] == 3
    bad = cli("keys", "create", "--tenant", name, "--scopes", "root")
    assert bad.returncode == 2 and "scopes" in bad.stdout
    assert cli("tenants", "set", name, "--max-queued-jobs", "5").returncode == 0
    assert client.get("/v1/me", headers=bearer(token)).json()["limits"]["max_queued_jobs"] == 5
    assert cli("keys", "revoke", token.split("_")[1]).returncode == 0
    assert client.get("/v1/me", headers=bearer(token)).status_code == 401
    second = cli("keys", "create", "--tenant", name).stdout.strip().rsplit(" ", 1)[-1]
    assert client.get("/v1/me", headers=bearer(second)).status_code == 200
    disabled = cli("tenants", "disable", name)
    assert disabled.returncode == 0 and "'keys_revoked': 1" in disabled.stdout
    assert client.get("/v1/me", headers=bearer(second)).status_code == 401
    assert cli("tenants", "disable", "default").returncode == 2


def test_first_start_prints_an_operator_key_once(tmp_path, capsys):
    from cli.admin import announce_auth
    from core.db import migrate
    from core.settings import Settings

    settings = Settings(data_dir=tmp_path, database_url="", broker_url="", auth_enabled=True)
    migrate(settings)
    announce_auth(settings)
    first = capsys.readouterr().out
    token = next(w for w in first.split() if w.startswith("ft_"))
    announce_auth(settings)
    assert "ft_" not in capsys.readouterr().out  # an operator key exists now: nothing printed
    app, _ = make_app(
        {"DATA_DIR": str(tmp_path), "AUTH_ENABLED": "true", "DATABASE_URL": "", "BROKER_URL": ""}
    )
    with TestClient(app) as c:
        me = c.get("/v1/me", headers=bearer(token)).json()
        assert me["scopes"] == ["admin", "operator", "read", "write"]
        assert me["tenant_id"] == "default"
        assert c.get("/v1/me").status_code == 401


def test_a_disabled_tenant_loses_its_keys_and_gets_no_new_ones(client, operator_token):
    op = bearer(operator_token)
    tenant_id, key = new_tenant(client, operator_token)
    assert client.get("/v1/me", headers=bearer(key)).status_code == 200
    resp = client.delete(f"/v1/admin/tenants/{tenant_id}", headers=op)
    assert resp.status_code == 200 and resp.json()["disabled_at"]
    assert client.get("/v1/me", headers=bearer(key)).status_code == 401
    again = client.post("/v1/admin/keys", json={"tenant": tenant_id}, headers=op)
    assert again.status_code == 409 and again.json()["error_code"] == "TENANT_DISABLED"
    default = client.delete("/v1/admin/tenants/default", headers=op)
    assert default.status_code == 409 and default.json()["error_code"] == "TENANT_PROTECTED"
    events = client.get(
        "/v1/admin/audit", params={"tenant": tenant_id, "action": "tenant.disable"}, headers=op
    ).json()
    assert events["count"] == 1 and events["data"][0]["detail"] == {"keys_revoked": 1}


def test_import_prefixes_can_be_per_tenant(client, operator_token, env):
    from tests.helpers import noise_image, png_bytes

    tenant_a, key_a = new_tenant(client, operator_token)
    _, key_b = new_tenant(client, operator_token)
    name_a = client.get("/v1/me", headers=bearer(key_a)).json()["tenant_name"]
    bucket = f"imports-{secrets.token_hex(3)}"
    s3 = s3_client(env)
    s3.create_bucket(Bucket=bucket)
    for j, cls in enumerate(("ant", "bee")):
        for i in range(3):
            s3.put_object(
                Bucket=bucket,
                Key=f"{name_a}/insects/{cls}/{i}.png",
                Body=png_bytes(noise_image(500 + i + 9 * j)),
            )
    app, _ = make_app(env, IMPORT_ALLOWED_PREFIXES=[f"s3://{bucket}/{{tenant}}/"])
    source = {"source": f"s3://{bucket}/{name_a}/insects"}
    with TestClient(app) as c:
        theirs = c.post("/v1/datasets/import", json=source, headers=bearer(key_b))
        assert theirs.status_code == 403 and theirs.json()["error_code"] == "IMPORT_NOT_ALLOWED"
        mine = c.post("/v1/datasets/import", json=source, headers=bearer(key_a))
        assert mine.status_code == 201, mine.text
        assert mine.json()["num_images"] == 6
        assert c.get(f"/v1/datasets/{mine.json()['id']}", headers=bearer(key_b)).status_code == 404

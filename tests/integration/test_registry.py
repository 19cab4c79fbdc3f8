"""The model registry against real PostgreSQL and S3, with auth on: a succeeded job's model
is registered with its success, versions count per name (also when jobs succeed at once),
PATCH renames, retags and restages, `name`, `name@3` and `name@production` resolve on the
download route, another tenant gets 404 on every registry route, and the migration registers
the jobs that succeeded before it."""

from __future__ import annotations

import secrets
import threading
from datetime import datetime, timedelta, timezone

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import select

from core import transitions
from core.db import alembic_config, session_scope
from core.jobs import MODEL_FORMATS
from core.models import AuditEvent, Job, RegisteredModel
from core.tenancy import create_key, create_tenant
from tests.conftest import PG_ADMIN
from tests.helpers import imagefolder_zip, s3_client
from tests.integration import test_tenancy
from tests.integration.test_tenancy import bearer, submit, upload

pytestmark = pytest.mark.integration

ZIP = imagefolder_zip({"cat": 3, "dog": 3})

# The tenancy tests' app, as this module's fixtures: auth on, a queue no worker reads (jobs
# succeed here by the worker's own transitions).
env = test_tenancy.env
client = test_tenancy.client


def new_key(*scopes: str) -> str:
    """A key of a new tenant (read and write unless `scopes` say otherwise)."""
    with session_scope() as s:
        tenant = create_tenant(s, f"reg-{secrets.token_hex(4)}")
        _, token = create_key(s, tenant, list(scopes or ("read", "write")), "registry test")
        s.commit()
    return token


def succeeded_job(client, env, token: str, dataset_id: str, val_accuracy: float = 0.9) -> str:
    """A job submitted through the API, then ended by the worker's own transitions: claimed,
    one epoch recorded, succeeded with model files (naming the job) stored in S3."""
    job_id = submit(client, token, dataset_id).json()["id"]
    s3 = s3_client(env)
    result = {"report": {"validation": {}}, "classes": ["cat", "dog"]}
    for result_key, _, filename in MODEL_FORMATS.values():
        key = f"jobs/{job_id}/model/{filename}"
        s3.put_object(Bucket=env["S3_BUCKET"], Key=key, Body=f"{filename} of {job_id}".encode())
        result[result_key] = key
    best = {"epoch": 1, "train_loss": 0.5, "val_accuracy": val_accuracy}
    with session_scope() as s:
        assert transitions.claim(s, job_id, "w")
        assert transitions.record_epoch(s, job_id, "w", best, best)
        assert transitions.succeed(s, job_id, "w", result)
    return job_id


def download(client, token: str, ref: str, fmt: str = "metadata") -> httpx.Response:
    resp = client.get(
        f"/v1/models/{ref}/download",
        params={"format": fmt},
        headers=bearer(token),
        follow_redirects=False,
    )
    if resp.status_code == 307:  # S3: the presigned URL, fetched without the API key
        return httpx.get(resp.headers["location"], timeout=30)
    return resp


def patch(client, token: str, ref: str, **body) -> httpx.Response:
    return client.patch(f"/v1/models/{ref}", json=body, headers=bearer(token))


def models(client, token: str, **params) -> dict:
    resp = client.get("/v1/models", params=params, headers=bearer(token))
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def pets(client, env):
    """A tenant with three succeeded jobs on `Pets (2024)` and one on `cats`."""
    token = new_key()
    ds = upload(client, token, ZIP, name="Pets (2024)").json()
    cats = upload(client, token, ZIP, name="cats").json()
    jobs = [succeeded_job(client, env, token, ds["id"], acc) for acc in (0.7, 0.8, 0.9)]
    cat_job = succeeded_job(client, env, token, cats["id"])
    return {"token": token, "ds": ds, "jobs": jobs, "cat_job": cat_job}


def test_a_succeeded_job_appears_named_after_its_dataset(client, pets):
    listed = models(client, pets["token"], name="pets-2024")
    assert listed["count"] == 3
    newest = listed["data"][0]
    assert newest["name"] == "pets-2024" and newest["version"] == 3
    assert newest["job_id"] == pets["jobs"][2] and newest["id"].startswith("mdl_")
    assert newest["tags"] == [] and newest["stage"] == "none"
    assert newest["metrics"]["val_accuracy"] == 0.9
    assert newest["backbone"] and newest["created_at"]
    assert newest["dataset_id"] == pets["ds"]["id"]
    assert newest["dataset_sha256"] == pets["ds"]["sha256"]
    one = client.get(f"/v1/models/{newest['id']}", headers=bearer(pets["token"])).json()
    assert one == newest


def test_versions_count_per_name_and_each_alias_resolves_on_download(client, pets):
    token = pets["token"]
    listed = models(client, token)["data"]
    assert [(m["name"], m["version"]) for m in listed] == [
        ("cats", 1),
        ("pets-2024", 3),
        ("pets-2024", 2),
        ("pets-2024", 1),
    ]
    first, second, third = pets["jobs"]
    for ref, job in [("pets-2024", third), ("pets-2024@2", second), ("pets-2024@1", first)]:
        got = download(client, token, ref)
        assert got.status_code == 200 and got.content == f"metadata.json of {job}".encode(), ref
    zipped = download(client, token, "cats", fmt="zip")
    assert zipped.content == f"model.zip of {pets['cat_job']}".encode()
    missing = download(client, token, "pets-2024@4")
    assert missing.status_code == 404 and missing.json()["error_code"] == "MODEL_NOT_FOUND"
    assert download(client, token, "pets-2024@production").status_code == 404


def test_production_and_staging_aliases_follow_patch_and_promotion_archives(client, pets):
    token = pets["token"]
    first, second, third = pets["jobs"]
    resp = patch(client, token, "pets-2024@1", stage="production", tags=["v1", "baseline"])
    assert resp.status_code == 200, resp.text
    assert resp.json()["stage"] == "production" and resp.json()["tags"] == ["v1", "baseline"]
    assert download(client, token, "pets-2024@production").content.endswith(first.encode())
    assert patch(client, token, "pets-2024@2", stage="production").status_code == 200
    assert download(client, token, "pets-2024@production").content.endswith(second.encode())
    was = client.get("/v1/models/pets-2024@1", headers=bearer(token)).json()
    assert was["stage"] == "archived" and was["tags"] == ["v1", "baseline"]
    assert patch(client, token, "pets-2024@3", stage="staging").status_code == 200
    assert download(client, token, "pets-2024@staging").content.endswith(third.encode())
    assert [m["version"] for m in models(client, token, stage="production")["data"]] == [2]
    with session_scope() as s:
        events = s.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "model.update", AuditEvent.object_id == was["id"]
            )
        ).all()
    assert [e.detail.get("stage") for e in events] == [["none", "production"]]
    promoted = [e for e in events if e.detail.get("tags")]
    assert promoted and promoted[0].detail["tags"] == [[], ["v1", "baseline"]]


def test_rename_makes_the_model_the_next_version_of_its_new_name(client, env):
    token = new_key()
    pets = upload(client, token, ZIP, name="pets").json()
    dogs = upload(client, token, ZIP, name="dogs").json()
    moved = succeeded_job(client, env, token, pets["id"])
    succeeded_job(client, env, token, dogs["id"])
    resp = patch(client, token, "pets", name="dogs", tags=["moved", "moved"])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["name"], body["version"], body["job_id"]) == ("dogs", 2, moved)
    assert body["tags"] == ["moved"]  # duplicates dropped
    assert download(client, token, "dogs").content.endswith(moved.encode())
    assert download(client, token, "pets").status_code == 404
    assert models(client, token, tag="moved")["count"] == 1
    assert models(client, token, tag="move")["count"] == 0  # a whole tag, not a substring


def test_list_filters_and_pages(client, pets):
    token = pets["token"]
    page = models(client, token, limit=2, offset=1)
    assert page["count"] == 4 and [m["version"] for m in page["data"]] == [3, 2]
    assert models(client, token, name="cats")["count"] == 1
    assert models(client, token, name="nope")["count"] == 0


@pytest.mark.parametrize(
    "body, says",
    [
        ({"name": "Has Spaces"}, "a-z, 0-9"),
        ({"name": "-dash-first"}, "a-z, 0-9"),
        ({"name": "x" * 65}, "64"),
        ({"stage": "live"}, "production"),
        ({"tags": ["ok", "Not OK"]}, "tags.1"),
        ({"tags": [f"t{i}" for i in range(21)]}, "20"),
        ({"owner": "me"}, "owner"),
    ],
)
def test_invalid_names_stages_and_tags_are_a_422_saying_what_is_accepted(client, pets, body, says):
    resp = patch(client, pets["token"], "cats", **body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error_code"] == "VALIDATION_ERROR" and says in resp.json()["detail"]


@pytest.mark.parametrize("ref", ["Cats", "cats@0", "cats@latest", "cats@archived", "a@b@c"])
def test_a_malformed_reference_is_a_422(client, pets, ref):
    resp = client.get(f"/v1/models/{ref}", headers=bearer(pets["token"]))
    assert resp.status_code == 422 and resp.json()["error_code"] == "VALIDATION_ERROR"


def test_patch_needs_the_write_scope(client, pets):
    resp = patch(client, new_key("read"), "cats", stage="staging")
    assert resp.status_code == 403 and resp.json()["error_code"] == "INSUFFICIENT_SCOPE"


REGISTRY_ROUTES = [
    ("GET", "/v1/models/{ref}", None),
    ("PATCH", "/v1/models/{ref}", {"stage": "archived", "name": "stolen", "tags": ["x"]}),
    ("GET", "/v1/models/{ref}/download", None),
]


@pytest.mark.parametrize("method, template, body", REGISTRY_ROUTES)
@pytest.mark.parametrize("alias", ["id", "pets-2024", "pets-2024@1", "pets-2024@production"])
def test_another_tenants_models_answer_404_on_every_registry_route(
    client, pets, method, template, body, alias
):
    owner = bearer(pets["token"])
    patch(client, pets["token"], "pets-2024@1", stage="production")
    target = client.get("/v1/models/pets-2024@1", headers=owner).json()
    ref = target["id"] if alias == "id" else alias
    resp = client.request(
        method, template.format(ref=ref), json=body, headers=bearer(new_key("read", "write"))
    )
    assert resp.status_code == 404 and resp.json()["error_code"] == "MODEL_NOT_FOUND"
    assert "location" not in resp.headers and target["job_id"] not in resp.text
    assert client.get(f"/v1/models/{target['id']}", headers=owner).json() == target
    assert models(client, new_key())["count"] == 0


def test_every_registry_route_is_in_the_isolation_test():
    """A new /v1/models route must join REGISTRY_ROUTES (or the tenancy matrix)."""
    from service.main import create_app

    paths = create_app().openapi()["paths"]
    found = {
        (method.upper(), path)
        for path, ops in paths.items()
        if path.startswith("/v1/models/")
        for method in ops
    }
    assert {(m, p) for m, p, _ in REGISTRY_ROUTES} <= found


def test_jobs_of_a_tenant_succeeding_at_once_get_distinct_versions(client, env):
    """Eight workers finish jobs on the same dataset at the same moment: each model gets its
    own version, 1 to 8, and every success is recorded (none fails on a duplicate)."""
    token = new_key()
    ds = upload(client, token, ZIP, name="race").json()["id"]
    jobs = [submit(client, token, ds).json()["id"] for _ in range(8)]
    with session_scope() as s:
        for i, job_id in enumerate(jobs):
            assert transitions.claim(s, job_id, f"w{i}")
    barrier = threading.Barrier(len(jobs))
    outcomes: dict[str, object] = {}

    def finish(i: int, job_id: str) -> None:
        barrier.wait()
        try:
            with session_scope() as s:
                outcomes[job_id] = transitions.succeed(s, job_id, f"w{i}", {"bundle_key": "k"})
        except Exception as exc:  # the failure this test exists to catch
            outcomes[job_id] = exc

    threads = [threading.Thread(target=finish, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v is True for v in outcomes.values()), outcomes
    listed = models(client, token, name="race", limit=20)["data"]
    assert sorted(m["version"] for m in listed) == list(range(1, 9))
    assert {m["job_id"] for m in listed} == set(jobs)


@pytest.fixture()
def pg_at_0010():
    """A fresh database migrated to the revision before the registry, and its URL."""
    name = f"finetune_reg_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "0010")
    yield url, cfg
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_migration_registers_the_jobs_that_succeeded_before_it(pg_at_0010):
    url, cfg = pg_at_0010
    engine = sa.create_engine(url)
    datasets, jobs = (
        sa.Table(t, sa.MetaData(), autoload_with=engine) for t in ("datasets", "jobs")
    )
    row = dict(archive_key="a", index_key="i", size_bytes=1, sha256="0" * 64, num_images=6)
    now = datetime.now(timezone.utc)
    row.update(classes=["cat", "dog"], class_counts={}, report={}, created_at=now)
    job = dict(config={"backbone": "resnet18"}, created_at=now, attempts=1)
    job.update(cancel_requested=False, epoch=1, total_epochs=1, step=1, total_steps=1)
    with engine.begin() as conn:
        conn.execute(datasets.insert(), [dict(row, id="ds_a", name="Old Pets.zip")])
        for i, status in enumerate(["succeeded", "failed", "succeeded", "running"]):
            finished = now - timedelta(minutes=10 - i)
            conn.execute(
                jobs.insert().values(
                    dict(job, id=f"job_{i}", dataset_id="ds_a", status=status, finished_at=finished)
                )
            )
    engine.dispose()
    command.upgrade(cfg, "head")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT job_id, name, version, stage FROM models")).all()
    engine.dispose()
    assert sorted(rows) == [
        ("job_0", "old-pets.zip", 1, "none"),
        ("job_2", "old-pets.zip", 2, "none"),
    ]


def test_a_success_whose_registration_fails_is_not_recorded(client, env, monkeypatch):
    """One transaction: when the model cannot be registered, the job is not succeeded either
    (it stays running, for the worker to finish again), so no succeeded job lacks its model."""
    from core import registry

    token = new_key()
    ds = upload(client, token, ZIP, name="together").json()["id"]
    job_id = submit(client, token, ds).json()["id"]
    with session_scope() as s:
        assert transitions.claim(s, job_id, "w")

    def broken(session, job_id):
        raise RuntimeError("registry down")

    monkeypatch.setattr(registry, "register", broken)
    with pytest.raises(RuntimeError), session_scope() as s:
        transitions.succeed(s, job_id, "w", {"bundle_key": "k"})
    monkeypatch.undo()
    with session_scope() as s:
        assert s.get(Job, job_id).status == "running"
        assert s.scalar(select(RegisteredModel).where(RegisteredModel.job_id == job_id)) is None
        assert transitions.succeed(s, job_id, "w", {"bundle_key": "k"})
    assert [m["job_id"] for m in models(client, token)["data"]] == [job_id]

"""The Python client against the real app (auth on, PostgreSQL, S3; a queue no worker
reads): uploads of every kind with their progress, typed results, the error codes, tenant
isolation, and following a job that ends without a worker (canceled)."""

from __future__ import annotations

import io
import secrets
import tarfile

import pytest
from fastapi.testclient import TestClient

from client import ApiError, Client
from core.db import session_scope
from core.models import DEFAULT_TENANT, Tenant
from core.tenancy import create_key
from tests.helpers import imagefolder_zip, noise_image, png_bytes
from tests.integration.test_tenancy import make_app

pytestmark = [
    pytest.mark.integration,
    # The client gives uploads a longer read timeout than TestClient cares for.
    pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument"),
]


@pytest.fixture(scope="module")
def env(integration_env):
    env = {
        **integration_env,
        "AUTH_ENABLED": "true",
        "TASK_QUEUE": f"client-{secrets.token_hex(4)}",
        "RATE_LIMIT_PER_MINUTE": "100000",
        "WEBHOOK_ALLOW_PRIVATE": "true",  # no DNS here: the endpoint is on loopback
    }
    yield env
    import redis

    redis.Redis.from_url(env["BROKER_URL"]).delete(env["TASK_QUEUE"])


@pytest.fixture(scope="module")
def http(env):
    app, _ = make_app(env)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def operator(http) -> Client:
    with session_scope() as s:
        tenant = s.get(Tenant, DEFAULT_TENANT)
        _, token = create_key(s, tenant, ["read", "write", "admin", "operator"], "client test")
        s.commit()
    return Client(api_key=token, http=http)


def tenant_client(http, operator: Client) -> Client:
    """A client with a read/write key of a new tenant, made through the admin API."""
    name = f"c-{secrets.token_hex(4)}"
    t = operator.transport
    t.request("POST", "/v1/admin/tenants", json={"name": name})
    key = t.request("POST", "/v1/admin/keys", json={"tenant": name}).json()["key"]
    return Client(api_key=key, http=http)


@pytest.fixture(scope="module")
def api(http, operator) -> Client:
    return tenant_client(http, operator)


def image_folder(root, counts: dict[str, int]):
    seed = 100
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            seed += 1
            (root / cls / f"{i}.png").write_bytes(png_bytes(noise_image(seed)))
    return root


def test_a_folder_uploads_zipped_on_the_fly_with_progress_and_is_listed(api, tmp_path):
    folder = image_folder(tmp_path / "pets", {"cat": 3, "dog": 4})
    seen: list[tuple[int, int | None]] = []
    ds = api.datasets.upload(folder, name="pets", progress=lambda s, t: seen.append((s, t)))
    assert (ds.name, ds.num_images, ds.num_classes) == ("pets", 7, 2)
    assert {c.name: c.count for c in ds.classes} == {"cat": 3, "dog": 4}
    sizes = sum(p.stat().st_size for p in folder.rglob("*.png"))
    assert seen[-1] == (sizes, sizes)
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)
    assert ds.id in [d.id for d in api.datasets.list().data]
    assert api.datasets.get(ds.id).sha256 == ds.sha256
    assert api.datasets.samples_png(ds.id).startswith(b"\x89PNG")


def test_zip_and_tar_archives_upload_as_they_are(api, tmp_path):
    data = imagefolder_zip({"a": 3, "b": 3})
    (tmp_path / "d.zip").write_bytes(data)
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tar:
        for i, cls in enumerate(["x", "y", "x", "y", "x", "y"]):
            payload = png_bytes(noise_image(500 + i))
            info = tarfile.TarInfo(f"{cls}/{i}.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert api.datasets.upload(tmp_path / "d.zip").num_images == 6
    ds = api.datasets.upload(tmp_path / "d.tar.gz")
    assert ds.num_images == 6 and [c.name for c in ds.classes] == ["x", "y"]
    api.datasets.delete(ds.id)
    with pytest.raises(ApiError) as exc:
        api.datasets.get(ds.id)
    assert exc.value.status == 404


def test_errors_carry_the_status_and_error_code(api, http, tmp_path):
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ApiError) as exc:
        api.datasets.upload(tmp_path / "notes.txt")
    assert (exc.value.status, exc.value.error_code) == (415, "DATASET_NOT_ARCHIVE")
    with pytest.raises(ApiError) as exc:
        api.jobs.get("nope")
    assert (exc.value.status, exc.value.error_code) == (404, "JOB_NOT_FOUND")
    with pytest.raises(ApiError) as exc:
        Client(api_key="ft_wrong", http=http).datasets.list()
    assert (exc.value.status, exc.value.error_code) == (401, "UNAUTHENTICATED")
    ds = api.datasets.list().data[0]
    with pytest.raises(ApiError) as exc:
        api.jobs.submit(ds.id, backbone="resnet9000")
    assert exc.value.status == 422 and "resnet9000" in exc.value.detail


def test_another_tenants_dataset_and_job_answer_404_like_missing_ones(api, http, operator):
    other = tenant_client(http, operator)
    ds = api.datasets.list().data[0]
    job = api.jobs.submit(ds.id, epochs=1)
    for call in (lambda: other.datasets.get(ds.id), lambda: other.jobs.get(job.id)):
        with pytest.raises(ApiError) as exc:
            call()
        assert exc.value.status == 404
    with pytest.raises(ApiError) as missing:
        other.jobs.get("0" * len(job.id))
    with pytest.raises(ApiError) as foreign:
        other.jobs.cancel(job.id)
    assert foreign.value.error_code == missing.value.error_code
    api.jobs.cancel(job.id)


def test_a_queued_job_is_listed_canceled_and_waited_for(api, tmp_path):
    ds = api.datasets.list().data[0]
    job = api.jobs.submit(ds.id, epochs=1, image_size=32, recipe="manual")
    assert job.status == "queued" and job.config["epochs"] == 1
    assert job.id in [j.id for j in api.jobs.list(status="queued").data]
    everyone = [j.id for j in api.jobs.iterate()]  # keyset pages, newest first
    assert everyone[0] == job.id and len(everyone) == len(set(everyone))
    assert len(everyone) == api.jobs.list(limit=1).count
    with pytest.raises(ApiError) as exc:
        api.jobs.download(job.id, tmp_path)
    assert (exc.value.status, exc.value.error_code) == (409, "MODEL_NOT_AVAILABLE")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ApiError) as exc:
        api.jobs.predict(job.id, [("x.png", png_bytes(noise_image(1)))])
    assert exc.value.status == 409
    assert api.jobs.cancel(job.id).status == "canceled"
    seen = []
    done = api.jobs.wait(job.id, callback=seen.append, timeout=30)
    assert done.status == "canceled" and done.terminal and seen[-1].status == "canceled"
    polled = list(api.jobs.events(job.id, stream=False))
    assert [e.job.status for e in polled if e.job] == ["canceled"]
    streamed = list(api.jobs.events(job.id))  # the server's event stream, which it has
    assert streamed[0].type == "status" and streamed[0].data["status"] == "canceled"
    assert streamed[-1].type == "end" and streamed[-1].job is None
    assert api.jobs.wait(job.id, stream=True).status == "canceled"
    with pytest.raises(ApiError) as exc:
        api.jobs.cancel(job.id)
    assert exc.value.status == 409


def test_webhooks_are_registered_listed_and_deleted(api):
    hook = api.webhooks.create("http://127.0.0.1:9/ft", events=["job.succeeded"])
    assert hook.secret and hook.events == ["job.succeeded"]
    assert [h.id for h in api.webhooks.list().data] == [hook.id]
    assert api.webhooks.get(hook.id).secret is None  # shown once
    assert api.webhooks.deliveries(hook.id).count == 0
    api.webhooks.delete(hook.id)
    with pytest.raises(ApiError) as exc:
        api.webhooks.create("ftp://127.0.0.1/hook")
    assert exc.value.status == 422


def test_registry_backbones_and_me_are_typed(api):
    me = api.me()
    assert me.auth_enabled and me.scopes == ["read", "write"]
    assert api.models.list().count == 0
    names = [b.name for b in api.backbones().data]
    assert "efficientnet_lite0" in names
    with pytest.raises(ApiError) as exc:
        api.models.get("nothing@production")
    assert exc.value.status == 404
    assert api.healthz() and api.readyz()

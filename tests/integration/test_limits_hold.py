"""Limits that must hold under concurrency and against uploads built to slip past them, on
PostgreSQL (with S3) and on the embedded SQLite (with the local store): the storage quota
is charged on the bytes actually stored and enforced atomically, and deleting a dataset
and submitting a job on it are serialised."""

from __future__ import annotations

import io
import secrets
import threading
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from core.db import migrate, session_scope
from core.models import Dataset, Job, JobStatus
from core.tenancy import create_key, create_tenant
from tests.helpers import make_zip, noise_image, png_bytes, s3_client

pytestmark = pytest.mark.integration


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def stack(request, integration_env, tmp_path_factory):
    """(client, settings) of an app with auth on: PostgreSQL + S3 + Redis, or the embedded
    SQLite + local store + SQLite broker; a task queue no worker reads."""
    from core.settings import Settings, get_settings
    from service.main import create_app

    env = {
        **{k.lower(): v for k, v in integration_env.items()},
        "auth_enabled": True,
        "task_queue": f"limits-{secrets.token_hex(4)}",
        # A bucket of its own: other tests count what is in theirs.
        "s3_bucket": f"limits-{secrets.token_hex(4)}",
        "rate_limit_per_minute": 1_000_000,
        "tenant_max_concurrent_uploads": 6,  # the race needs them all in flight at once
    }
    if request.param == "sqlite":
        data_dir = tmp_path_factory.mktemp("embedded")
        env.update(data_dir=str(data_dir), database_url="", broker_url="", storage_backend="local")
    settings = Settings(**env)
    migrate(settings)
    from core.storage import get_store

    get_store(settings).check()  # creates the bucket
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as client:
        yield client, settings


def new_tenant(settings, **limits: Any) -> str:
    """A read+write key of a new tenant with `limits`."""
    with session_scope(settings) as s:
        tenant = create_tenant(s, f"lim-{secrets.token_hex(4)}", **limits)
        _, token = create_key(s, tenant, ["read", "write"], "limits test")
        s.commit()
    return token


def upload(client, token: str, data: bytes, name: str = "d"):
    return client.post(
        "/v1/datasets",
        files={"file": (f"{name}.zip", data, "application/zip")},
        data={"name": name},
        headers=bearer(token),
    )


def dataset_prefixes(settings) -> set[str]:
    """The dataset folders in the object store, whoever owns them."""
    if settings.storage_backend == "s3":
        env = {
            "S3_ENDPOINT_URL": settings.s3_endpoint_url,
            "S3_ACCESS_KEY_ID": settings.s3_access_key_id,
            "S3_SECRET_ACCESS_KEY": settings.s3_secret_access_key,
            "S3_REGION": settings.s3_region,
        }
        pages = s3_client(env).get_paginator("list_objects_v2")
        keys = [
            obj["Key"]
            for page in pages.paginate(Bucket=settings.s3_bucket, Prefix="datasets/")
            for obj in page.get("Contents", [])
        ]
        return {k.split("/")[1] for k in keys}
    root = Path(settings.resolved_storage_dir) / "datasets"
    return {p.name for p in root.iterdir()} if root.exists() else set()


def stored_bytes(settings, dataset_id: str) -> int:
    from core.storage import get_store

    store = get_store(settings)
    names = ("images.zip", "index.json", "samples.png")
    return sum(store.size(f"datasets/{dataset_id}/{n}") for n in names)


def concurrently(n: int, call: Any) -> list[Any]:
    """`call(i)` for i < n on n threads released at the same moment."""
    start = threading.Barrier(n)

    def run(i: int) -> Any:
        start.wait()
        return call(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


# --- the storage quota ------------------------------------------------------------------

# Incompressible images: the canonical archive holds about what was uploaded (~300 KB).
NOISE_ZIP = make_zip(
    (f"{c}/{i}.png", png_bytes(noise_image(100 + 10 * j + i, size=128)))
    for j, c in enumerate(("cat", "dog"))
    for i in range(3)
)


def test_concurrent_uploads_never_take_a_tenant_past_its_storage_limit(stack):
    client, settings = stack
    limit = 1_000_000
    token = new_tenant(settings, max_storage_bytes=limit)
    before = dataset_prefixes(settings)
    results = concurrently(6, lambda i: upload(client, token, NOISE_ZIP, f"race{i}"))
    codes = Counter(r.status_code for r in results)
    assert set(codes) <= {201, 403}, [r.text for r in results]
    assert all(r.json()["error_code"] == "STORAGE_LIMIT" for r in results if r.status_code == 403)
    made = [r.json()["id"] for r in results if r.status_code == 201]
    used = client.get("/v1/me", headers=bearer(token)).json()["usage"]["storage_bytes"]
    assert 1 <= len(made) < 6 and used <= limit, (codes, used)
    # Each one stored is as large as each other: exactly as many as fit were kept.
    assert len(made) == limit // stored_bytes(settings, made[0])
    # The refused ones left nothing in the store.
    assert dataset_prefixes(settings) - before == set(made)


def bmp_bytes(seed: int, size: int = 320) -> bytes:
    """A banded picture: its BMP deflates about 80x, under the 200x decompression-bomb ratio."""
    y, x = np.arange(size)[:, None], np.arange(size)[None, :]
    band = ((x // 8 + y // 8 + seed) % 7 * 30).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([band, np.roll(band, seed, 1), band[::-1]], -1)).save(buf, "BMP")
    return buf.getvalue()


def deflated_bmps_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for j, cls in enumerate(("a", "b")):
            for i in range(3):
                zf.writestr(f"{cls}/{i}.bmp", bmp_bytes(7 * i + 11 * j))
    return buf.getvalue()


def test_the_quota_charges_the_bytes_stored_not_the_bytes_uploaded(stack):
    client, settings = stack
    data = deflated_bmps_zip()  # ~25 KB that stores as ~1.8 MB
    limit = 1_000_000
    assert len(data) * 20 < limit
    token = new_tenant(settings, max_storage_bytes=limit)
    before = dataset_prefixes(settings)
    resp = upload(client, token, data, "bands")
    assert resp.status_code == 403, resp.text
    assert resp.json()["error_code"] == "STORAGE_LIMIT" and "max_storage_bytes" in resp.text
    me = client.get("/v1/me", headers=bearer(token)).json()
    assert me["usage"]["storage_bytes"] == 0
    assert client.get("/v1/datasets", headers=bearer(token)).json()["count"] == 0
    assert dataset_prefixes(settings) == before
    # With room for it, it is stored, and what it is charged is what the store holds.
    roomy = new_tenant(settings, max_storage_bytes=10 * limit)
    ok = upload(client, roomy, data, "bands")
    assert ok.status_code == 201, ok.text
    used = client.get("/v1/me", headers=bearer(roomy)).json()["usage"]["storage_bytes"]
    assert used == stored_bytes(settings, ok.json()["id"]) > limit


# --- delete and submit ------------------------------------------------------------------


def test_deleting_a_dataset_and_submitting_a_job_on_it_never_both_succeed(stack):
    client, settings = stack
    token = new_tenant(settings)
    small = make_zip(
        (f"{c}/{i}.png", png_bytes(noise_image(300 + 10 * j + i)))
        for j, c in enumerate(("cat", "dog"))
        for i in range(3)
    )
    outcomes = []
    for attempt in range(8):
        ds = upload(client, token, small, f"race{attempt}").json()["id"]

        def act(i: int, ds: str = ds) -> Any:
            if i == 0:
                return client.delete(f"/v1/datasets/{ds}", headers=bearer(token))
            return client.post(
                "/v1/jobs",
                json={"dataset_id": ds, "epochs": 1, "image_size": 32},
                headers=bearer(token),
            )

        deleted, *submits = concurrently(3, act)
        codes = (deleted.status_code, tuple(sorted(s.status_code for s in submits)))
        outcomes.append(codes)
        if deleted.status_code == 204:
            assert all(s.status_code == 404 for s in submits), codes
            assert all(s.json()["error_code"] == "DATASET_NOT_FOUND" for s in submits)
        else:
            assert deleted.status_code == 409, deleted.text
            assert deleted.json()["error_code"] == "DATASET_IN_USE"
            assert any(s.status_code == 201 for s in submits), codes
    # No job waits on a dataset that is gone.
    with session_scope(settings) as s:
        orphans = s.scalars(
            select(Job.id)
            .join(Dataset, Dataset.id == Job.dataset_id)
            .where(Dataset.deleted_at.is_not(None), Job.status == JobStatus.QUEUED.value)
        ).all()
    assert orphans == [], outcomes

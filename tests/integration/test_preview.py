"""Augmentation previews on the real stack: the API process (no torch) sends the render to a
worker's light queue, answers 202 while it runs and serves the stored PNG after."""

import secrets
import time
from io import BytesIO

import httpx
import pytest
from PIL import Image

from tests.conftest import wait_for
from tests.helpers import imagefolder_zip, s3_client

pytestmark = pytest.mark.integration

PREVIEW = "/v1/datasets/{}/augmentations/preview"


@pytest.fixture(scope="module")
def client(server_url, worker_process):
    with httpx.Client(base_url=server_url, timeout=60) as c:
        yield c


def upload(client) -> str:
    data = imagefolder_zip({"a": 4, "b": 4})
    resp = client.post("/v1/datasets", files={"file": ("d.zip", data, "application/zip")})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def until_rendered(client, url, params, worker_process) -> httpx.Response:
    def done():
        resp = client.get(url, params=params)
        assert resp.status_code in (200, 202, 422), resp.text
        return resp if resp.status_code != 202 else None

    try:
        return wait_for(done, 120, "the preview", interval=0.5)
    except TimeoutError:
        raise AssertionError(worker_process.log_path.read_text()[-3000:]) from None


def test_augmentation_preview_is_a_png_grid_and_is_cached(client, worker_process):
    url = PREVIEW.format(upload(client))
    params = {"preset": "strong", "image_size": 48, "samples": 2, "hflip": "false"}
    first = client.get(url, params=params)
    assert first.status_code == 202, first.text
    assert first.headers["retry-after"] == "2" and first.json()["status"] == "rendering"
    rendered = until_rendered(client, url, params, worker_process)
    assert rendered.status_code == 200 and rendered.headers["content-type"] == "image/png"
    image = Image.open(BytesIO(rendered.content))
    assert image.format == "PNG"
    assert image.size == (120 + 4 * (48 + 4), 2 * (48 + 4))  # label column + 4 draws, 2 rows
    started = time.monotonic()
    again = client.get(url, params=params)
    assert again.status_code == 200 and again.content == rendered.content
    assert time.monotonic() - started < 2.0  # from the store, not rendered again
    bad = client.get(url, params={"preset": "wild"})
    assert bad.status_code == 422 and "preset" in bad.json()["detail"]
    missing = client.get(PREVIEW.format("ds_nope"))
    assert missing.status_code == 404


def test_another_tenants_dataset_has_no_preview(client):
    from core.db import session_scope
    from core.models import Dataset
    from core.tenancy import create_tenant

    ds_id = upload(client)
    with session_scope() as s:
        other = create_tenant(s, f"other-{secrets.token_hex(4)}")
        s.get(Dataset, ds_id).tenant_id = other.id
    resp = client.get(PREVIEW.format(ds_id), params={"image_size": 48, "samples": 1})
    assert resp.status_code == 404 and resp.json()["error_code"] == "DATASET_NOT_FOUND"


def test_a_preview_that_cannot_render_is_a_422_saying_why(client, worker_process, stack_env):
    ds_id = upload(client)
    s3_client(stack_env).delete_object(
        Bucket=stack_env["S3_BUCKET"], Key=f"datasets/{ds_id}/images.zip"
    )
    url = PREVIEW.format(ds_id)
    params = {"image_size": 48, "samples": 1}
    assert client.get(url, params=params).status_code == 202
    failed = until_rendered(client, url, params, worker_process)
    assert failed.status_code == 422 and failed.json()["error_code"] == "PREVIEW_FAILED"
    assert "deleted" in failed.json()["detail"]
    assert client.get(url, params=params).status_code == 422  # remembered, not re-sent

"""Explanations on the real stack: the API process (no torch) checks the image, stores the
model's input and sends `finetune.explain` to a worker's light queue; it answers 202 while the
worker runs Grad-CAM, then serves the stored prediction and overlay, from the store when the
same image is asked for again. Hostile files are refused naming the file; another tenant's
job answers 404 on every route; a job without a model, 409."""

from __future__ import annotations

import io
import json
import secrets
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image

from core import queue, transitions
from core.db import session_scope
from core.models import DEFAULT_TENANT, Job, new_id
from tests.conftest import wait_for
from tests.helpers import imagefolder_zip, noise_image, png_bytes, s3_client

pytestmark = pytest.mark.integration

CLASSES = ["cat", "dog"]
SIZE = 64  # the model's input: small, so the worker explains in a fraction of a second


@pytest.fixture(scope="module")
def client(server_url, worker_process):
    with httpx.Client(base_url=server_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def dataset_id(client) -> str:
    resp = client.post(
        "/v1/datasets",
        files={"file": ("d.zip", imagefolder_zip({"cat": 3, "dog": 3}), "application/zip")},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def make_job(dataset_id: str, env: dict[str, str], with_model: bool = True) -> str:
    """A job row as a worker leaves it: succeeded with a real (untrained) lite0 model in the
    store, as in test_tenancy's isolation fixture; or queued, with no model yet."""
    import torch
    from safetensors.torch import save

    from core.backbones import BACKBONES
    from core.jobspec import JobSpec
    from worker.training.backbones import build_architecture
    from worker.training.export import build_metadata

    job_id = new_id("job")
    with session_scope() as s:
        s.add(
            Job(
                id=job_id,
                tenant_id=DEFAULT_TENANT,
                dataset_id=dataset_id,
                status="queued",
                config={"backbone": "efficientnet_lite0", "image_size": SIZE},
                total_epochs=1,
            )
        )
    if not with_model:
        return job_id
    torch.manual_seed(0)
    model = build_architecture(BACKBONES["efficientnet_lite0"], len(CLASSES))
    metadata = build_metadata(JobSpec(image_size=SIZE), CLASSES, {}, {})
    keys = {name: f"jobs/{job_id}/model/{name}" for name in ("model.zip", "metadata.json")}
    keys["model.safetensors"] = f"jobs/{job_id}/model/model.safetensors"
    s3 = s3_client(env)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    s3.put_object(Bucket=env["S3_BUCKET"], Key=keys["model.safetensors"], Body=save(state))
    s3.put_object(
        Bucket=env["S3_BUCKET"], Key=keys["metadata.json"], Body=json.dumps(metadata).encode()
    )
    with session_scope() as s:
        assert transitions.claim(s, job_id, "w-explain")
        assert transitions.succeed(
            s,
            job_id,
            "w-explain",
            {
                "bundle_key": keys["model.zip"],
                "safetensors_key": keys["model.safetensors"],
                "metadata_key": keys["metadata.json"],
                "classes": CLASSES,
            },
        )
    return job_id


def explain(client, job_id: str, name: str, data: bytes, **form: str) -> httpx.Response:
    return client.post(
        f"/v1/jobs/{job_id}/explain", files={"file": (name, data)}, data=form or None
    )


def until_settled(client, status_url: str, worker_process) -> dict:
    def settled():
        body = client.get(status_url).json()
        return body if body["status"] != "pending" else None

    try:
        return wait_for(settled, 120, "the explanation", interval=0.3)
    except TimeoutError:
        raise AssertionError(worker_process.log_path.read_text()[-3000:]) from None


def stored_keys(env: dict[str, str], prefix: str) -> list[str]:
    listed = s3_client(env).list_objects_v2(Bucket=env["S3_BUCKET"], Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_an_explanation_is_pending_then_done_with_an_overlay_and_then_cached(
    client, dataset_id, stack_env, worker_process
):
    job_id = make_job(dataset_id, stack_env)
    pixels = noise_image(7, 80)
    first = explain(client, job_id, "photo.png", png_bytes(pixels))
    assert first.status_code == 202, first.text
    body = first.json()
    assert body["status"] == "pending" and first.headers["retry-after"] == "1"
    assert body["status_url"] == f"/v1/jobs/{job_id}/explanations/{body['id']}"
    assert body["image_url"] == body["status_url"] + ".png" and body["target"] is None

    done = until_settled(client, body["status_url"], worker_process)
    assert done["status"] == "done", done
    prediction = done["prediction"]
    assert prediction["task"] == "single-label" and prediction["input_size"] == SIZE
    assert {p["label"] for p in prediction["top_k"]} == set(CLASSES)
    assert sum(p["probability"] for p in prediction["top_k"]) == pytest.approx(1.0, abs=1e-4)
    assert prediction["explained"] == prediction["top_k"][0]
    assert prediction["predicted"] == [prediction["top_k"][0]["label"]]
    overlay = client.get(body["image_url"])
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(overlay.content)).size == (SIZE, SIZE)

    # The same pixels again, even in another lossless format: served from the store.
    bmp = io.BytesIO()
    Image.fromarray(pixels).save(bmp, format="BMP")
    again = explain(client, job_id, "photo.bmp", bmp.getvalue())
    assert again.status_code == 200 and again.json() == done  # 200 at once: no task sent

    # Another class on request: another explanation of the same prediction.
    other_class = next(c for c in CLASSES if c != prediction["explained"]["label"])
    asked = explain(client, job_id, "photo.png", png_bytes(pixels), target=other_class)
    assert asked.status_code == 202 and asked.json()["id"] != body["id"]
    other = until_settled(client, asked.json()["status_url"], worker_process)
    assert other["target"] == other_class and other["prediction"]["explained"]["label"] == (
        other_class
    )
    assert other["prediction"]["top_k"] == prediction["top_k"]
    # What is stored is the model's input, never the upload.
    key = queue.explanation_key(job_id, body["id"])
    stored = s3_client(stack_env).get_object(Bucket=stack_env["S3_BUCKET"], Key=f"{key}.input.png")
    assert Image.open(io.BytesIO(stored["Body"].read())).size == (SIZE, SIZE)


def bomb_png() -> bytes:
    """A valid 64x64 PNG whose header claims 100000 x 100000 pixels."""
    data = png_bytes(noise_image(3, 64))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return data[:16] + bytes(ihdr) + crc + data[33:]


HOSTILE = [
    ("notes.txt", b"not an image at all", "not a readable image"),
    ("bomb.png", bomb_png(), "decompression bomb"),
    ("cut.png", png_bytes(noise_image(4, 64))[:300], "corrupt or truncated"),
    ("empty.jpg", b"", "empty"),
]


def test_hostile_uploads_are_refused_naming_the_file_and_nothing_is_stored(
    client, dataset_id, stack_env
):
    job_id = make_job(dataset_id, stack_env)
    for name, data, why in HOSTILE:
        resp = explain(client, job_id, name, data)
        assert resp.status_code == 422, (name, resp.text)
        assert resp.json()["error_code"] == "IMAGE_INVALID"
        assert repr(name) in resp.json()["detail"] and why in resp.json()["detail"], resp.text
    missing = client.post(f"/v1/jobs/{job_id}/explain", data={"target": "cat"})
    assert missing.status_code == 422 and "'file'" in missing.json()["detail"]
    unknown = explain(client, job_id, "a.png", png_bytes(noise_image(5, 32)), target="horse")
    assert unknown.status_code == 422 and "'horse'" in unknown.json()["detail"]
    assert "'cat', 'dog'" in unknown.json()["detail"]
    huge = explain(client, job_id, "huge.png", b"\0" * (20 * 1024**2 + 1))
    assert huge.status_code == 413 and "MAX_IMAGE_UPLOAD_BYTES" in huge.json()["detail"]
    assert stored_keys(stack_env, queue.explanations_prefix(job_id)) == []


def test_another_tenants_job_answers_404_on_every_explain_route(client, dataset_id, stack_env):
    from core.tenancy import create_tenant

    job_id = make_job(dataset_id, stack_env)
    own = explain(client, job_id, "a.png", png_bytes(noise_image(6, 48)))
    assert own.status_code == 202
    with session_scope() as s:
        other = create_tenant(s, f"other-{secrets.token_hex(4)}")
        s.get(Job, job_id).tenant_id = other.id
    status_url = own.json()["status_url"]
    for resp in (
        explain(client, job_id, "a.png", png_bytes(noise_image(6, 48))),
        explain(client, job_id, "notes.txt", b"not an image"),  # ownership before the body
        client.post(f"/v1/jobs/{job_id}/explain"),
        client.get(status_url),
        client.get(status_url + ".png"),
    ):
        assert resp.status_code == 404, resp.text
        assert resp.json()["error_code"] == "JOB_NOT_FOUND"
    missing = client.get(f"/v1/jobs/job_nope/explanations/{'0' * 32}")
    assert missing.status_code == 404 and missing.json()["error_code"] == "JOB_NOT_FOUND"


def test_a_job_without_a_model_is_409(client, dataset_id, stack_env):
    job_id = make_job(dataset_id, stack_env, with_model=False)
    for resp in (
        explain(client, job_id, "a.png", png_bytes(noise_image(8, 32))),
        client.post(f"/v1/jobs/{job_id}/explain"),
    ):
        assert resp.status_code == 409, resp.text
        assert resp.json()["error_code"] == "MODEL_NOT_AVAILABLE" and "queued" in resp.text
    unknown = client.get(f"/v1/jobs/{job_id}/explanations/{'0' * 32}")
    assert unknown.status_code == 404 and unknown.json()["error_code"] == "EXPLANATION_NOT_FOUND"


def test_an_explanation_that_cannot_be_made_says_why_and_is_remembered(
    client, dataset_id, stack_env, worker_process
):
    job_id = make_job(dataset_id, stack_env)
    s3_client(stack_env).delete_object(
        Bucket=stack_env["S3_BUCKET"], Key=f"jobs/{job_id}/model/model.safetensors"
    )
    image = png_bytes(noise_image(9, 40))
    first = explain(client, job_id, "a.png", image)
    assert first.status_code == 202
    failed = until_settled(client, first.json()["status_url"], worker_process)
    assert failed["status"] == "failed" and "model.safetensors" in failed["error"]
    png = client.get(first.json()["image_url"])
    assert png.status_code == 422 and png.json()["error_code"] == "EXPLANATION_FAILED"
    again = explain(client, job_id, "a.png", image)
    assert again.status_code == 200 and again.json()["status"] == "failed"  # not sent again


def test_a_lost_task_is_sent_again_when_its_marker_is_stale(
    client, dataset_id, stack_env, worker_process
):
    """An explanation whose task never reached a worker (a broker restart): its pending
    marker grows old, and the next status request sends the task again."""
    job_id = make_job(dataset_id, stack_env)
    first = explain(client, job_id, "a.png", png_bytes(noise_image(10, 40)))
    assert until_settled(client, first.json()["status_url"], worker_process)["status"] == "done"
    s3, bucket = s3_client(stack_env), stack_env["S3_BUCKET"]
    done_key = queue.explanation_key(job_id, first.json()["id"])
    lost = secrets.token_hex(16)
    lost_key = queue.explanation_key(job_id, lost)
    for suffix in (".input.png", ".request.json"):
        body = s3.get_object(Bucket=bucket, Key=done_key + suffix)["Body"].read()
        s3.put_object(Bucket=bucket, Key=lost_key + suffix, Body=body)
    s3.put_object(Bucket=bucket, Key=lost_key + ".pending", Body=str(time.time() - 61).encode())
    status_url = f"/v1/jobs/{job_id}/explanations/{lost}"
    assert client.get(status_url).json()["status"] == "pending"
    assert until_settled(client, status_url, worker_process)["status"] == "done"

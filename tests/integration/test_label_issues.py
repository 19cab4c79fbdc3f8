"""Label issues on the real stack: a digits dataset with labels flipped on purpose is trained
by a real worker, which finds the suspect labels after export; the API lists them, most
suspect first, pages them, serves their sheets and counts them in the report. Another
tenant's job answers 404; a job with none to serve, 409 saying why."""

from __future__ import annotations

import secrets
import time

import httpx
import numpy as np
import pytest

from core import transitions
from core.db import session_scope
from core.models import DEFAULT_TENANT, Job, new_id
from tests.helpers import digits_samples, make_zip, png_bytes

pytestmark = pytest.mark.integration

IMAGES, FLIPPED = 400, 20


@pytest.fixture(scope="module")
def client(server_url, worker_process):
    with httpx.Client(base_url=server_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def finished(client, worker_process) -> tuple[str, set[str], str]:
    """(job id, the archive paths of the flipped images, dataset id): 400 digits, 20 of them
    filed under another class's folder, trained by a linear probe at 32 px."""
    train, _ = digits_samples(limit=IMAGES)
    rng = np.random.default_rng(0)
    flipped = set(rng.choice(IMAGES, FLIPPED, replace=False).tolist())
    files, flipped_paths = [], set()
    for i, (img, label) in enumerate(train):
        if i in flipped:
            label = (label + int(rng.integers(1, 10))) % 10
        path = f"digits/{label}/{i:05d}.png"
        files.append((path, png_bytes(img)))
        if i in flipped:
            flipped_paths.add(path)
    ds = client.post(
        "/v1/datasets", files={"file": ("digits.zip", make_zip(files), "application/zip")}
    )
    assert ds.status_code == 201, ds.text
    job = client.post(
        "/v1/jobs",
        json={
            "dataset_id": ds.json()["id"],
            "recipe": "manual",
            "strategy": "linear_probe",
            "image_size": 32,
            "epochs": 1,
        },
    )
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job_id}").json()
        if state["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"job did not finish: {worker_process.log_path.read_text()[-3000:]}")
    assert state["status"] == "succeeded", state["error"]
    return job_id, flipped_paths, ds.json()["id"]


def test_the_flipped_digits_are_listed_first(client, finished):
    job_id, flipped, _ = finished
    resp = client.get(f"/v1/jobs/{job_id}/label-issues", params={"limit": 2 * FLIPPED})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert 0 < len(body["data"]) <= 2 * FLIPPED and body["count"] >= len(body["data"])
    assert body["images"] == IMAGES and "cleanlab" in body["method"]
    assert sum(body["per_class"].values()) == body["count"]
    first = [item["path"] for item in body["data"]]
    assert len(set(first) & flipped) >= FLIPPED // 2, (first, flipped)
    for item in body["data"]:
        assert item["given_label"] == item["path"].split("/")[1]  # its folder: the label given
        assert item["suggested_label"] != item["given_label"] and 0 <= item["score"] <= 1
    scores = [item["score"] for item in body["data"]]
    assert scores == sorted(scores)


def test_pages_follow_the_ranking(client, finished):
    job_id, _, _ = finished
    url = f"/v1/jobs/{job_id}/label-issues"
    first = client.get(url, params={"limit": 3}).json()
    second = client.get(url, params={"limit": 1, "offset": 1}).json()
    assert second["data"] == first["data"][1:2] and second["count"] == first["count"]
    past = client.get(url, params={"offset": 10**6}).json()
    assert past["data"] == [] and past["count"] == first["count"]
    bad = client.get(url, params={"limit": 0})
    assert bad.status_code == 422 and "limit" in bad.text


def test_sheets_and_the_reports_count(client, finished):
    job_id, _, _ = finished
    for name in ("label_issues", "top_losses"):
        png = client.get(f"/v1/jobs/{job_id}/plots/{name}.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG"), name
    count = client.get(f"/v1/jobs/{job_id}/label-issues").json()["count"]
    summary = client.get(f"/v1/jobs/{job_id}/report").json()["training"]["label_issues"]
    assert summary["count"] == count and summary["images"] == IMAGES
    assert summary["features"] == "probe" and 0 < summary["share_of_job"] < 1
    assert summary["top_losses"] > 0


def test_another_tenants_job_answers_404(client, finished):
    from core.tenancy import create_tenant

    job_id, _, _ = finished
    with session_scope() as s:
        other = create_tenant(s, f"other-{secrets.token_hex(4)}")
        s.get(Job, job_id).tenant_id = other.id
    try:
        for url in (f"/v1/jobs/{job_id}/label-issues", f"/v1/jobs/{job_id}/plots/top_losses.png"):
            resp = client.get(url)
            assert resp.status_code == 404 and resp.json()["error_code"] == "JOB_NOT_FOUND"
        missing = client.get("/v1/jobs/job_nope/label-issues")
        assert missing.status_code == 404 and missing.json()["error_code"] == "JOB_NOT_FOUND"
    finally:
        with session_scope() as s:
            s.get(Job, job_id).tenant_id = DEFAULT_TENANT


def test_a_job_with_no_label_issues_is_409_saying_why(client, finished):
    _, _, dataset_id = finished
    queued, older = new_id("job"), new_id("job")
    with session_scope() as s:
        for job_id in (queued, older):
            s.add(
                Job(
                    id=job_id,
                    tenant_id=DEFAULT_TENANT,
                    dataset_id=dataset_id,
                    status="queued",
                    config={"backbone": "efficientnet_lite0"},
                    total_epochs=1,
                )
            )
    with session_scope() as s:  # succeeded before label issues existed
        assert transitions.claim(s, older, "w-old")
        assert transitions.succeed(s, older, "w-old", {"report": {}, "training": {}})
    for job_id, why in ((queued, "queued"), (older, "ran before")):
        resp = client.get(f"/v1/jobs/{job_id}/label-issues")
        assert resp.status_code == 409, resp.text
        assert resp.json()["error_code"] == "LABEL_ISSUES_NOT_AVAILABLE"
        assert why in resp.json()["detail"]

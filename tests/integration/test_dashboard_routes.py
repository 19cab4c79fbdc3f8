"""What the dashboard's routes answer without a browser: the page and its files are
public and carry the security headers; the download link keeps /model's rules."""

import pytest

from tests.helpers import imagefolder_zip

pytestmark = pytest.mark.integration


def test_page_and_static_files_are_public_with_a_content_security_policy(api):
    for path, kind in (("/", "text/html"), ("/static/app.js", "javascript")):
        resp = api.get(path)
        assert resp.status_code == 200 and kind in resp.headers["content-type"], path
        assert "script-src 'self'" in resp.headers["content-security-policy"], path
        assert resp.headers["x-content-type-options"] == "nosniff"
    assert api.get("/static/nope.js").status_code == 404
    assert api.get("/static/../main.py").status_code == 404


def test_model_link_of_a_missing_job_is_a_404_and_of_an_unfinished_one_a_409(api):
    resp = api.get("/v1/jobs/job_nope/model/link")
    assert resp.status_code == 404 and resp.json()["error_code"] == "JOB_NOT_FOUND"
    ds = api.post(
        "/v1/datasets",
        files={"file": ("d.zip", imagefolder_zip({"a": 4, "b": 4}), "application/zip")},
    ).json()
    job = api.post("/v1/jobs", json={"dataset_id": ds["id"]}).json()
    resp = api.get(f"/v1/jobs/{job['id']}/model/link")
    assert resp.status_code == 409 and resp.json()["error_code"] == "MODEL_NOT_AVAILABLE"
    resp = api.get(f"/v1/jobs/{job['id']}/model/link", params={"format": "exe"})
    assert resp.status_code == 422 and "format" in resp.text

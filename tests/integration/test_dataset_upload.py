"""POST /v1/datasets against PostgreSQL and an S3 endpoint: good and bad uploads."""

import boto3
import pytest

from tests.helpers import imagefolder_zip, make_zip, noise_image, png_bytes

pytestmark = pytest.mark.integration


def objects(env, prefix="datasets/"):
    s3 = boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    try:
        return [
            o["Key"]
            for o in s3.list_objects_v2(Bucket=env["S3_BUCKET"], Prefix=prefix).get("Contents", [])
        ]
    except s3.exceptions.NoSuchBucket:
        return []


def upload(api, data: bytes, filename="data.zip", **form):
    return api.post("/v1/datasets", files={"file": (filename, data, "application/zip")}, data=form)


def test_upload_returns_id_classes_and_counts_and_stores_archive_and_index(api, integration_env):
    resp = upload(api, imagefolder_zip({"cat": 3, "dog": 4}), name="pets")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["id"].startswith("ds_") and body["name"] == "pets"
    assert body["classes"] == [{"name": "cat", "count": 3}, {"name": "dog", "count": 4}]
    assert body["num_images"] == 7 and len(body["sha256"]) == 64
    keys = objects(integration_env, f"datasets/{body['id']}/")
    assert sorted(keys) == [
        f"datasets/{body['id']}/archive.zip",
        f"datasets/{body['id']}/index.json",
    ]
    assert api.get(f"/v1/datasets/{body['id']}").json() == body


def test_partly_broken_upload_is_accepted_and_lists_what_was_rejected(api):
    data = make_zip(
        [
            (f"{c}/{i}.png", png_bytes(noise_image(i + 9 * j)))
            for j, c in enumerate("ab")
            for i in range(3)
        ]
        + [("a/broken.png", b"not an image"), ("b/readme.md", b"# hi")]
    )
    body = upload(api, data).json()
    assert body["num_images"] == 6
    assert [r["path"] for r in body["rejected"]] == ["a/broken.png"]
    assert [s["path"] for s in body["skipped"]] == ["b/readme.md"]


@pytest.mark.parametrize(
    "data, status, code, mentions",
    [
        (b"PK\x03\x04 definitely not a zip", 415, "DATASET_NOT_ZIP", "zip"),
        (make_zip([]), 422, "DATASET_EMPTY", "no image files"),
        (imagefolder_zip({"solo": 3}), 422, "DATASET_TOO_FEW_CLASSES", "'solo'"),
        (imagefolder_zip({"a": 3, "b": 1}), 422, "DATASET_CLASS_TOO_SMALL", "'b' has 1"),
        (
            make_zip([("a/1.png", b"x"), ("b/1.png", b"y")]),
            422,
            "DATASET_NO_VALID_IMAGES",
            "a/1.png",
        ),
    ],
    ids=["not-a-zip", "empty-zip", "single-class", "class-with-one-image", "nothing-decodes"],
)
def test_bad_uploads_get_a_4xx_naming_the_problem_and_leave_nothing_behind(
    api, integration_env, data, status, code, mentions
):
    before_objects = objects(integration_env)
    before_count = api.get("/v1/datasets").json()["count"]
    resp = upload(api, data)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error_code"] == code
    assert mentions in body["detail"]
    assert objects(integration_env) == before_objects
    assert api.get("/v1/datasets").json()["count"] == before_count


def test_missing_file_field_is_a_422(api):
    resp = api.post("/v1/datasets", data={"name": "x"})
    assert resp.status_code == 422 and resp.json()["error_code"] == "VALIDATION_ERROR"
    assert "file" in resp.json()["detail"]


def test_unknown_dataset_is_a_404(api):
    resp = api.get("/v1/datasets/ds_doesnotexist")
    assert resp.status_code == 404 and resp.json()["error_code"] == "DATASET_NOT_FOUND"


def test_oversized_upload_is_refused_with_413_before_it_is_stored(integration_env):
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.settings import Settings

    small = create_app(Settings(max_upload_bytes=2048))
    before = objects(integration_env)
    with TestClient(small) as client:
        resp = upload(client, imagefolder_zip({"a": 20, "b": 20}))
    assert resp.status_code == 413
    assert resp.json()["error_code"] == "UPLOAD_TOO_LARGE"
    assert "2048" in resp.json()["detail"]
    assert objects(integration_env) == before

"""POST /v1/datasets against PostgreSQL and an S3 endpoint: good and bad uploads."""

import pytest

from tests.helpers import imagefolder_zip, make_zip, noise_image, png_bytes, s3_client

pytestmark = pytest.mark.integration


def objects(env, prefix="datasets/"):
    s3 = s3_client(env)
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
        f"datasets/{body['id']}/{name}" for name in ("images.zip", "index.json", "samples.png")
    ]
    assert body["layout"] == "imagefolder" and body["format"] == "zip"
    assert body["splits"] == {"unsplit": {"cat": 3, "dog": 4}}
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
        (b"PK\x03\x04 definitely not a zip", 415, "DATASET_NOT_ARCHIVE", "zip"),
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

    from core.settings import Settings
    from service.main import create_app

    small = create_app(Settings(max_upload_bytes=2048))
    before = objects(integration_env)
    with TestClient(small) as client:
        resp = upload(client, imagefolder_zip({"a": 20, "b": 20}))
    assert resp.status_code == 413
    assert resp.json()["error_code"] == "UPLOAD_TOO_LARGE"
    assert "2048" in resp.json()["detail"]
    assert objects(integration_env) == before


def test_a_tar_gz_with_train_val_test_folders_keeps_its_splits(api):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        seed = 0
        for split, n in (("train", 3), ("val", 2), ("test", 2)):
            for cls in ("x", "y"):
                for i in range(n):
                    seed += 1
                    data = png_bytes(noise_image(seed))
                    info = tarfile.TarInfo(f"set/{split}/{cls}/{i}.png")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    body = upload(api, buf.getvalue(), filename="set.tar.gz").json()
    assert body["format"] == "tar" and body["layout"] == "splits" and body["name"] == "set"
    assert body["splits"] == {
        "test": {"x": 2, "y": 2},
        "train": {"x": 3, "y": 3},
        "val": {"x": 2, "y": 2},
    }
    assert body["leakage"]["groups"] == 0 and body["duplicates"]["exact_groups"] == 0


def test_the_same_images_packed_differently_have_the_same_content_hash(api):
    files = [
        (f"{c}/{i}.png", png_bytes(noise_image(i + 7 * j)))
        for j, c in enumerate("ab")
        for i in range(3)
    ]
    first = upload(api, make_zip(files)).json()
    second = upload(api, make_zip(list(reversed(files)))).json()
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]


def test_sample_thumbnails_are_a_png_with_a_row_per_class(api):
    import io

    from PIL import Image

    ds = upload(api, imagefolder_zip({"cat": 3, "dog": 2, "eel": 2})).json()
    resp = api.get(f"/v1/datasets/{ds['id']}/samples.png")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(resp.content)).height == 3 * 68


def test_delete_is_refused_while_a_job_uses_the_dataset_then_removes_it(api, integration_env):
    from core.db import session_scope
    from core.models import Job

    ds = upload(api, imagefolder_zip({"a": 3, "b": 3})).json()
    job = api.post("/v1/jobs", json={"dataset_id": ds["id"], "epochs": 1}).json()
    refused = api.delete(f"/v1/datasets/{ds['id']}")
    assert refused.status_code == 409 and refused.json()["error_code"] == "DATASET_IN_USE"
    assert job["id"] in refused.json()["detail"]
    with session_scope() as s:  # the job ends (as a worker would record it)
        s.get(Job, job["id"]).status = "failed"
    assert api.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert api.get(f"/v1/datasets/{ds['id']}").status_code == 404
    assert objects(integration_env, f"datasets/{ds['id']}/") == []
    assert api.get(f"/v1/jobs/{job['id']}").json()["config"]["dataset_sha256"] == ds["sha256"]
    again = api.post("/v1/jobs", json={"dataset_id": ds["id"]})
    assert again.status_code == 404 and again.json()["error_code"] == "DATASET_NOT_FOUND"


def test_hostile_uploads_write_nothing_outside_their_own_prefix(api, integration_env):
    import io
    import tarfile

    evil = [
        ("../../etc/x.png", png_bytes(noise_image(1))),
        ("/abs/y.png", png_bytes(noise_image(2))),
    ]
    good = [
        (f"{c}/{i}.png", png_bytes(noise_image(40 + i + 5 * j)))
        for j, c in enumerate("ab")
        for i in range(2)
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in evil + good:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
        tf.addfile(link)
    body = upload(api, buf.getvalue(), filename="evil.tar").json()
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import Dataset

    with session_scope() as s:  # every tenant's datasets: other tests upload as other tenants
        ids = set(s.scalars(select(Dataset.id)))
    assert {r["path"] for r in body["rejected"]} == {"../../etc/x.png", "/abs/y.png", "a/link.png"}
    for key in objects(integration_env, ""):
        assert key.split("/")[0] in ("datasets", "jobs")
        if key.startswith("datasets/"):
            assert key.split("/")[1] in ids | {body["id"]}


def test_a_dataset_already_in_the_object_store_is_registered_without_upload(integration_env):
    from fastapi.testclient import TestClient

    from core.settings import Settings, get_settings
    from service.main import create_app

    s3 = s3_client(integration_env)
    s3.create_bucket(Bucket="lake")
    for j, cls in enumerate(("ant", "bee")):
        for i in range(3):
            s3.put_object(
                Bucket="lake",
                Key=f"raw/insects/{cls}/{i}.png",
                Body=png_bytes(noise_image(300 + i + 9 * j)),
            )
    s3.put_object(Bucket="lake", Key="raw/insects/ant/.DS_Store", Body=b"junk")
    s3.put_object(Bucket="lake", Key="private/secret/0.png", Body=png_bytes(noise_image(1)))

    settings = Settings(import_allowed_prefixes=["s3://lake/raw/"])
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app) as client:
        resp = client.post("/v1/datasets/import", json={"source": "s3://lake/raw/insects"})
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["name"] == "insects" and body["format"] == "s3"
        assert body["classes"] == [{"name": "ant", "count": 3}, {"name": "bee", "count": 3}]
        refused = client.post("/v1/datasets/import", json={"source": "s3://lake/private/secret"})
        assert refused.status_code == 403 and refused.json()["error_code"] == "IMPORT_NOT_ALLOWED"
        missing = client.post("/v1/datasets/import", json={"source": "s3://lake/raw/nothing"})
        assert missing.status_code == 422 and missing.json()["error_code"] == "DATASET_EMPTY"
    assert objects(integration_env, f"datasets/{body['id']}/")  # copied into our own prefix


def test_import_is_off_unless_prefixes_are_allowed(api):
    resp = api.post("/v1/datasets/import", json={"source": "s3://anything/at/all"})
    assert resp.status_code == 403 and "IMPORT_ALLOWED_PREFIXES" in resp.json()["detail"]

"""The whole path over HTTP with real processes: upload digits, train in a Celery worker,
poll until done, download, and use the model files outside the service."""

import io
import json
import time
import zipfile

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import digits_samples, digits_zip

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(server_url, worker_process, tmp_path_factory):
    train, held_out = digits_samples()
    # Model downloads from S3 are a 307 to a presigned URL on the S3 endpoint.
    client = httpx.Client(base_url=server_url, timeout=60, follow_redirects=True)
    ds = client.post(
        "/v1/datasets", files={"file": ("digits.zip", digits_zip(train), "application/zip")}
    )
    assert ds.status_code == 201, ds.text
    job = client.post(
        "/v1/jobs",
        json={
            "dataset_id": ds.json()["id"],
            "epochs": 3,
            "image_size": 32,
            "batch_size": 32,
            "learning_rate": 1e-3,
            "augmentation": {"hflip": False},
        },
    ).json()
    seen = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job['id']}").json()
        seen.append(state)
        if state["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.5)
    else:
        pytest.fail(
            f"job did not finish; worker log:\n{worker_process.log_path.read_text()[-3000:]}"
        )
    assert state["status"] == "succeeded", state["error"]
    resp = client.get(f"/v1/jobs/{job['id']}/model")
    assert resp.status_code == 200
    out = tmp_path_factory.mktemp("model")
    zipfile.ZipFile(io.BytesIO(resp.content)).extractall(out)
    return client, job["id"], seen, state, out, held_out


def test_job_runs_to_success_with_live_progress(trained):
    _, _, seen, final, _, _ = trained
    statuses = [s["status"] for s in seen]
    assert "running" in statuses and statuses[-1] == "succeeded"
    running = [s for s in seen if s["status"] == "running" and s["progress"]["total_steps"]]
    assert running, "progress was never reported while running"
    assert any(s["progress"]["eta_seconds"] is not None for s in running)
    assert all(s["heartbeat_age_seconds"] is not None for s in running)
    fractions = [s["progress"]["fraction"] for s in running]
    assert fractions == sorted(fractions)
    assert final["progress"]["fraction"] == 1.0 and final["model_available"]
    assert final["attempts"] == 1 and final["finished_at"] is not None


def test_per_epoch_metrics_are_recorded(trained):
    client, job_id, _, final, _, _ = trained
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()
    # Epoch 0 is the linear probe of the default lp_ft strategy, then 3 fine-tuning epochs.
    assert metrics["count"] == 4 and [m["epoch"] for m in metrics["data"]] == [0, 1, 2, 3]
    for m in metrics["data"]:
        assert m["train_loss"] > 0 and 0 <= m["val_accuracy"] <= 1
        assert m["val_loss"] > 0 and m["images_per_second"] > 0
    assert final["best_metrics"]["val_accuracy"] == max(m["val_accuracy"] for m in metrics["data"])
    assert final["latest_metrics"]["epoch"] == 3


def test_downloaded_model_files_load_outside_the_service_and_agree(trained):
    """Rebuild from safetensors with timm alone, load TorchScript with torch alone."""
    import timm

    _, _, _, _, out, held_out = trained
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["backbone"] == "efficientnet_lite0" and meta["class_names"] == [
        str(i) for i in range(10)
    ]
    assert meta["input_size"] == [3, 32, 32] and meta["mean"] == [0.5, 0.5, 0.5]
    assert "torch" in meta["library_versions"] and "val_accuracy" in meta["metrics"]

    rebuilt = timm.create_model(meta["architecture"], num_classes=meta["num_classes"])
    rebuilt.load_state_dict(load_file(str(out / "model.safetensors")))
    rebuilt.eval()
    scripted = torch.jit.load(str(out / "model.torchscript.pt")).eval()

    # Preprocess from metadata alone: resize, center crop, normalize.
    size, resize = meta["input_size"][1], meta["resize_size"]
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    batch = []
    for img, _ in held_out:
        im = Image.fromarray(img).convert("RGB").resize((resize, resize), Image.Resampling.BICUBIC)
        off = int(round((resize - size) / 2))
        im = im.crop((off, off, off + size, off + size))
        batch.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
    x = (torch.stack(batch).float() / 255 - mean) / std
    with torch.no_grad():
        a, b = rebuilt(x), scripted(x)
    assert torch.allclose(a, b, atol=1e-4)
    preds = [meta["class_names"][i] for i in a.argmax(1).tolist()]
    accuracy = sum(p == str(y) for p, (_, y) in zip(preds, held_out, strict=True)) / len(held_out)
    assert accuracy > 0.85, accuracy  # chance is 0.1


def test_each_download_format_is_served(trained):
    client, job_id, _, _, out, _ = trained
    for fmt, name in [
        ("safetensors", "model.safetensors"),
        ("torchscript", "model.torchscript.pt"),
        ("metadata", "metadata.json"),
    ]:
        resp = client.get(f"/v1/jobs/{job_id}/model", params={"format": fmt})
        assert resp.status_code == 200
        assert resp.content == (out / name).read_bytes()
        assert f"{job_id}-{name}" in resp.headers["content-disposition"]
    assert client.get(f"/v1/jobs/{job_id}/model", params={"format": "pickle"}).status_code == 422


def test_succeeded_jobs_are_listed_by_status(trained):
    client, job_id, _, _, _, _ = trained
    ids = [j["id"] for j in client.get("/v1/jobs", params={"status": "succeeded"}).json()["data"]]
    assert job_id in ids


def test_report_has_the_full_evaluation(trained):
    client, job_id, _, final, _, held_out = trained
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    val = report["validation"]
    assert report["classes"] == [str(i) for i in range(10)] and report["test"] is None
    n = val["num_samples"]
    # About 20% of the 1437 uploaded digits: near copies move as one group (core/duplicates).
    assert 0.15 * 1437 <= n <= 0.25 * 1437
    if report["training"].get("refit"):  # a delivered probe refitted on train + validation
        assert val["held_out"] is False
        assert val["top1_accuracy"] >= final["best_metrics"]["val_accuracy"] - 0.01
    else:
        assert val["top1_accuracy"] == pytest.approx(
            final["best_metrics"]["val_accuracy"], abs=1e-6
        )
    assert val["top5_accuracy"] >= val["top1_accuracy"]
    assert 0 <= val["ece"] <= 1 and 0 < val["macro_f1"] <= 1
    assert len(val["per_class"]) == 10 and {"precision", "recall", "f1", "support"} <= set(
        val["per_class"][0]
    )
    cm = val["confusion_matrix"]
    assert sum(map(sum, cm)) == n and sum(cm[i][i] for i in range(10)) / n == pytest.approx(
        val["top1_accuracy"]
    )
    assert report["training"]["strategy"] == "lp_ft" and "probe" in report["training"]


@pytest.mark.parametrize("name", ["curves", "confusion_matrix"])
def test_plots_are_served_as_png(trained, name):
    client, job_id, _, _, _, _ = trained
    resp = client.get(f"/v1/jobs/{job_id}/plots/{name}.png")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(resp.content))
    assert image.format == "PNG" and image.width > 300 and image.height > 200
    missing = client.get(f"/v1/jobs/{job_id}/plots/roc.png")
    assert missing.status_code == 404 and "curves" in missing.json()["detail"]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(side: int = 100_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_hosted_predictions_equal_onnxruntime_run_locally_on_the_downloaded_file(trained):
    """The route answers what the bundle's model.onnx gives with onnxruntime and numpy alone
    (the README's snippet): the same top class and probabilities, one image or a batch."""
    import onnxruntime as ort

    client, job_id, _, _, out, held_out = trained
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["onnx"]["top1_agreement"] == 1.0 and meta["onnx"]["max_abs_logit_diff"] <= 1e-3
    assert (out / "README.md").read_text().startswith("# Model card")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    samples = held_out[:12]
    files = [("files", (f"d{i}.png", _png(img), "image/png")) for i, (img, _) in enumerate(samples)]
    resp = client.post(f"/v1/jobs/{job_id}/predict", files=files, params={"top_k": 3})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["count"] == 12 and body["task"] == "single-label" and body["input_size"] == 32

    size, resize = meta["input_size"][1], meta["resize_size"]
    off = int(round((resize - size) / 2))
    mean = np.array(meta["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(meta["std"], np.float32).reshape(1, 3, 1, 1)
    crops = [
        np.asarray(
            Image.fromarray(img)
            .convert("RGB")
            .resize((resize, resize), Image.Resampling.BICUBIC)
            .crop((off, off, off + size, off + size))
        )
        for img, _ in samples
    ]
    x = (np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 255 - mean) / std
    (logits,) = session.run(None, {"input": x})
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    correct = 0
    for i, item in enumerate(body["data"]):
        assert item["filename"] == f"d{i}.png" and len(item["top"]) == 3
        best = item["top"][0]
        assert best["label"] == meta["class_names"][int(probs[i].argmax())]
        assert best["probability"] == pytest.approx(float(probs[i].max()), abs=1e-4)
        assert [t["probability"] for t in item["top"]] == sorted(
            (t["probability"] for t in item["top"]), reverse=True
        )
        correct += best["label"] == str(samples[i][1])
    assert correct >= 9  # the model learned (chance is 1 in 10)
    # The same model through the registry: by id, by name@version, by name@production.
    models = client.get("/v1/models", params={"limit": 500}).json()["data"]
    (model,) = [m for m in models if m["job_id"] == job_id]
    ref = f"{model['name']}@{model['version']}"
    patched = client.patch(f"/v1/models/{model['id']}", json={"stage": "production"})
    assert patched.status_code == 200, patched.text
    for alias in (model["id"], ref, f"{model['name']}@production"):
        via = client.post(f"/v1/models/{alias}/predict", files=files, params={"top_k": 3})
        assert via.status_code == 200 and via.json()["data"] == body["data"], alias
    one = client.post(f"/v1/jobs/{job_id}/predict", files=files[:1]).json()
    assert one["data"][0]["top"][0] == body["data"][0]["top"][0] and len(one["data"][0]["top"]) == 5

    onnx = client.get(f"/v1/jobs/{job_id}/model", params={"format": "onnx"})
    assert onnx.status_code == 200 and onnx.content == (out / "model.onnx").read_bytes()
    card = client.get(f"/v1/jobs/{job_id}/model", params={"format": "card"})
    assert card.status_code == 200 and "## Limitations" in card.text
    int8 = client.get(f"/v1/jobs/{job_id}/model", params={"format": "onnx_int8"})
    assert int8.status_code == 409 and "export_int8" in int8.json()["detail"]


def test_hostile_or_wrong_images_on_predict_are_a_4xx_naming_the_file(trained):
    client, job_id, _, _, _, held_out = trained
    good = ("files", ("good.png", _png(held_out[0][0]), "image/png"))
    truncated = _png(np.full((64, 64), 128, np.uint8))[:60]
    cases = [
        ("notes.txt", b"just some text", "not a readable image"),
        ("bomb.png", png_bomb(), "decompression bomb"),
        ("cut.png", truncated, "corrupt or truncated"),
        ("empty.png", b"", "empty"),
    ]
    for name, data, reason in cases:
        resp = client.post(
            f"/v1/jobs/{job_id}/predict", files=[good, ("files", (name, data, "image/png"))]
        )
        assert resp.status_code == 422, (name, resp.text)
        body = resp.json()
        assert body["error_code"] == "IMAGE_INVALID" and name in body["detail"], body
        assert reason in body["detail"] and "JPEG, PNG" in body["detail"]
    # Decoded side by side, reported in the request's order: the first bad file is named.
    two_bad = [good, ("files", ("cut.png", truncated, "image/png"))] + [
        ("files", ("notes.txt", b"just some text", "image/png"))
    ]
    resp = client.post(f"/v1/jobs/{job_id}/predict", files=[*two_bad, good, good])
    assert resp.status_code == 422 and "cut.png" in resp.json()["detail"], resp.text
    assert "notes.txt" not in resp.json()["detail"]
    many = [good] * 33
    resp = client.post(f"/v1/jobs/{job_id}/predict", files=many)
    assert resp.status_code == 422 and "PREDICT_MAX_IMAGES" in resp.json()["detail"]
    assert client.post(f"/v1/jobs/{job_id}/predict").status_code == 422  # no file at all
    missing = client.post("/v1/jobs/job_nothere/predict", files=[good])
    assert missing.status_code == 404 and missing.json()["error_code"] == "JOB_NOT_FOUND"

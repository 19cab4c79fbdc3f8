"""The training library on its own: no Celery, no database, no network."""

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from core.jobspec import Augmentation, JobSpec
from tests.helpers import digits_samples, digits_zip, ingest_bytes
from worker.training.callbacks import Callbacks
from worker.training.data import prepare, stratified_split
from worker.training.export import (
    build_metadata,
    export_checks,
    export_model,
    load_model,
    preprocess,
)
from worker.training.fit import fit
from worker.training.onnx_export import VERIFY_IMAGES


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Fine-tune lite0 on 600 digits at 32 px for 2 epochs: small, but it must learn."""
    tmp = tmp_path_factory.mktemp("digits")
    train, held_out = digits_samples(limit=600)
    archive = tmp / "images.zip"
    report = ingest_bytes(digits_zip(train), archive)
    config = JobSpec(
        epochs=2,
        image_size=32,
        batch_size=32,
        learning_rate=2e-3,
        seed=3,
        augmentation=Augmentation(hflip=False),
    )
    data = prepare(archive, report.index(), config, tmp / "cache")

    class Recorder(Callbacks):
        def __init__(self):
            self.steps, self.epochs, self.phases = [], [], []

        def on_phase(self, phase):
            self.phases.append(phase)

        def on_step(self, epoch, step, steps_per_epoch):
            self.steps.append((epoch, step, steps_per_epoch))

        def on_epoch_end(self, metrics, best):
            self.epochs.append((metrics, best))

    recorder = Recorder()
    result = fit(config, data, recorder, num_workers=0)
    return config, data, result, recorder, held_out, tmp


def test_fine_tuning_learns_digits_well_above_chance(digits_run):
    _, _, result, _, _, _ = digits_run
    assert [h["epoch"] for h in result.history] == [0, 1, 2]  # lp_ft: the probe is epoch 0
    assert result.best["val_accuracy"] > 0.6  # chance is 0.1
    tuned = [h for h in result.history if h["phase"] == "fine_tune"]
    assert tuned[-1]["train_loss"] < tuned[0]["train_loss"]


def test_progress_flows_out_through_callbacks(digits_run):
    _, _, result, recorder, _, _ = digits_run
    steps_per_epoch = recorder.steps[0][2]
    assert len(recorder.steps) == 2 * steps_per_epoch
    assert recorder.steps[-1] == (2, steps_per_epoch, steps_per_epoch)
    assert [m["epoch"] for m, _ in recorder.epochs] == [0, 1, 2]
    assert recorder.phases == ["extracting features", "probing", "training"]
    assert recorder.epochs[-1][1] == result.best
    for metrics, _ in recorder.epochs:
        assert metrics["images_per_second"] > 0 and metrics["epoch_seconds"] > 0
        assert metrics["loader_images_per_second"] > 0


def test_exported_safetensors_onnx_and_torchscript_give_the_same_predictions(digits_run):
    import onnxruntime as ort

    config, data, result, _, held_out, tmp = digits_run
    metadata = build_metadata(config, result.classes, result.best, {})
    checks = export_checks(data, config)
    paths, warned = export_model(
        result.model, metadata, tmp / "model", checks, int8=True, card=lambda m: "# card\n"
    )
    assert warned == []
    assert {p.name for p in paths.values()} >= {
        "model.safetensors",
        "model.onnx",
        "model.int8.onnx",
        "metadata.json",
        "model.torchscript.pt",
        "README.md",
    }
    written = json.loads(paths["metadata.json"].read_text())
    assert written["onnx"]["top1_agreement"] == 1.0
    assert written["onnx"]["max_abs_logit_diff"] <= 1e-3
    # onnxruntime ran every check image; PyTorch the least certain ones (all when few).
    assert written["onnx"]["onnx_images"] == len(checks.images) > 0
    checked = written["onnx"]["checked_images"]
    assert min(len(checks.images), VERIFY_IMAGES) <= checked <= len(checks.images)
    if config.augmentation.hflip:  # flip TTA was measured, and shipped only if it helped
        tta = written["tta_check"]
        assert written.get("tta") == ("hflip" if tta["use"] else None)
        assert tta["use"] == (
            tta["accuracy_hflip"] >= tta["accuracy"] + 0.005 and tta["loss_hflip"] < tta["loss"]
        )
    else:
        assert "tta" not in written
    int8 = written["onnx_int8"]
    assert int8["bytes"] < int8["fp32_bytes"] / 2  # int8 weights: about a quarter
    assert abs(int8["accuracy_change"]) < 0.2 and int8["top1_agreement_with_fp32"] > 0.7

    rebuilt, meta = load_model(tmp / "model")
    scripted = torch.jit.load(str(paths["model.torchscript.pt"])).eval()
    images = [Image.fromarray(img) for img, _ in held_out[:64]]
    batch = preprocess(images, meta)
    with torch.no_grad():
        a, b = rebuilt(batch), scripted(batch)
    assert torch.allclose(a, b, atol=1e-4)
    # The ONNX file, fed by the API's numpy preprocessing, gives the same logits; any batch.
    session = ort.InferenceSession(str(paths["model.onnx"]), providers=["CPUExecutionProvider"])
    for n in (1, 3, 64):
        (c,) = session.run(None, {"input": batch[:n].numpy()})
        assert np.abs(c - a[:n].numpy()).max() < 1e-3
    labels = [meta["class_names"][i] for i in a.argmax(1).tolist()]
    accuracy = sum(p == str(y) for p, (_, y) in zip(labels, held_out[:64], strict=True)) / 64
    assert accuracy > 0.5
    assert json.loads((tmp / "model" / "metadata.json").read_text())["mean"] == [0.5, 0.5, 0.5]


def test_an_onnx_file_that_disagrees_is_left_out_and_said_so(digits_run, monkeypatch):
    from worker.training import onnx_export

    config, data, result, _, _, tmp = digits_run
    monkeypatch.setattr(onnx_export, "MAX_LOGIT_DIFF", -1.0)  # nothing can pass
    metadata = build_metadata(config, result.classes, result.best, {})
    paths, warned = export_model(result.model, metadata, tmp / "bad", export_checks(data, config))
    assert "model.onnx" not in paths and not (tmp / "bad" / "model.onnx").exists()
    assert warned and "onnxruntime disagrees with PyTorch" in warned[0]
    assert "OnnxMismatch" in metadata["onnx"]["error"]
    with zipfile.ZipFile(paths["model.zip"]) as zf:
        assert "model.onnx" not in zf.namelist() and "model.safetensors" in zf.namelist()
        # Weights stored (deflate saves 8% of them for seconds of a job), text deflated.
        kinds = {info.filename: info.compress_type for info in zf.infolist()}
        assert kinds["model.safetensors"] == kinds["model.torchscript.pt"] == zipfile.ZIP_STORED
        assert kinds["metadata.json"] == zipfile.ZIP_DEFLATED


def test_preprocess_matches_the_validation_transform(digits_run):
    config, data, result, _, _, tmp = digits_run
    metadata = build_metadata(config, result.classes, result.best, {})
    val = data.val_set(config)
    x, _ = val[0]
    # The cache holds the resized image; preprocess must reproduce the same center crop.
    raw = data.cache[int(data.val_idx[0])]
    ours = preprocess([Image.fromarray(raw)], metadata)[0]
    assert torch.allclose(ours, x, atol=1e-5)


def test_stratified_split_holds_out_every_class():
    labels = [0] * 10 + [1] * 3 + [2] * 2
    train, val = stratified_split(labels, 0.2, seed=1)
    assert sorted(set(train) | set(val)) == list(range(15)) and not set(train) & set(val)
    assert sorted(labels[i] for i in val) == [0, 0, 1, 2]


def test_same_seed_gives_the_same_split():
    labels = list(range(5)) * 20
    assert all(
        (a == b).all()
        for a, b in zip(
            stratified_split(labels, 0.3, 7), stratified_split(labels, 0.3, 7), strict=True
        )
    )

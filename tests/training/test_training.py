"""The training library on its own: no Celery, no database, no network."""

import json

import pytest
import torch
from PIL import Image

from core.jobspec import Augmentation, JobSpec
from tests.helpers import digits_samples, digits_zip, ingest_bytes
from worker.training.callbacks import Callbacks
from worker.training.data import prepare, stratified_split
from worker.training.export import build_metadata, export_model, load_model, preprocess
from worker.training.fit import fit


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


def test_exported_safetensors_and_torchscript_give_the_same_predictions(digits_run):
    config, data, result, _, held_out, tmp = digits_run
    metadata = build_metadata(config, result.classes, result.best, {})
    paths = export_model(result.model, metadata, tmp / "model")
    assert {p.name for p in paths.values()} >= {
        "model.safetensors",
        "metadata.json",
        "model.torchscript.pt",
    }

    rebuilt, meta = load_model(tmp / "model")
    scripted = torch.jit.load(str(paths["model.torchscript.pt"])).eval()
    images = [Image.fromarray(img) for img, _ in held_out[:64]]
    batch = preprocess(images, meta)
    with torch.no_grad():
        a, b = rebuilt(batch), scripted(batch)
    assert torch.allclose(a, b, atol=1e-4)
    labels = [meta["class_names"][i] for i in a.argmax(1).tolist()]
    accuracy = sum(p == str(y) for p, (_, y) in zip(labels, held_out[:64], strict=True)) / 64
    assert accuracy > 0.5
    assert json.loads((tmp / "model" / "metadata.json").read_text())["mean"] == [0.5, 0.5, 0.5]


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

"""Grad-CAM explanations (worker/explain.py) on real models on the CPU: where the heatmap
lands, its shape on every backbone, the overlay, and the prediction next to it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from core.backbones import BACKBONES
from core.imaging import crop_for_model, preprocess
from core.jobspec import JobSpec
from worker.explain import (
    explain_image,
    flip_tta_grad_cam,
    grad_cam,
    model_input,
    prepare,
    target_layers,
)
from worker.training.backbones import build_architecture, create_model
from worker.training.export import build_metadata


def metadata_for(backbone: str, size: int, classes: list[str], **extra) -> dict:
    config = JobSpec(backbone=backbone, image_size=size)
    return build_metadata(config, classes, {}, {}, **extra)


@pytest.fixture(scope="module")
def imagenet_lite0():
    """lite0 with its ImageNet head (weights from the efficientnet-lite0 package)."""
    model = prepare(create_model("efficientnet_lite0", 1000, keep_imagenet_head=True))
    return model, metadata_for("efficientnet_lite0", 224, [f"c{i}" for i in range(1000)])


def flower_on_one_side(side: str) -> np.ndarray:
    """A photo of a flower on one half of a flat grey 224x224 square."""
    flower = np.asarray(Image.fromarray(load_sample_image("flower.jpg")).resize((112, 112)))
    canvas = np.full((224, 224, 3), 128, dtype=np.uint8)
    left = 0 if side == "left" else 112
    canvas[56:168, left : left + 112] = flower
    return canvas


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_heatmap_of_the_predicted_class_lies_on_the_object(imagenet_lite0, side):
    model, metadata = imagenet_lite0
    heatmap, logits = grad_cam(model, model_input(flower_on_one_side(side), metadata), None)
    assert heatmap.shape == (224, 224) and logits.shape == (1000,)
    assert heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0, abs=1e-4)
    on_left = heatmap[:, :112].sum() / heatmap.sum()
    assert (on_left if side == "left" else 1 - on_left) > 0.75, on_left


def test_the_overlay_is_a_png_of_the_input_and_the_prediction_names_the_class(imagenet_lite0):
    model, metadata = imagenet_lite0
    crop = flower_on_one_side("left")
    png, prediction = explain_image(model, metadata, crop, None)
    overlay = np.asarray(Image.open(io.BytesIO(png)))
    assert overlay.shape == (224, 224, 3) and not np.array_equal(overlay, crop)
    with torch.no_grad():
        probs = torch.softmax(model(model_input(crop, metadata))[0], dim=0)
    top = f"c{int(probs.argmax())}"
    assert prediction["task"] == "single-label" and prediction["predicted"] == [top]
    assert prediction["explained"]["label"] == top == prediction["top_k"][0]["label"]
    assert prediction["explained"]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert len(prediction["top_k"]) == 5
    assert [p["probability"] for p in prediction["top_k"]] == sorted(
        (p["probability"] for p in prediction["top_k"]), reverse=True
    )
    # Another class on request: the same prediction, another heatmap.
    other_png, other = explain_image(model, metadata, crop, "c1")
    assert other["explained"]["label"] == "c1" and other["predicted"] == [top]
    assert other_png != png
    # The hooks are gone: the cached model is left as it was.
    layer = target_layers(model)[0][0]
    assert not layer._forward_hooks and not any(p.requires_grad for p in model.parameters())


def test_an_unknown_target_is_refused_naming_it(imagenet_lite0):
    model, metadata = imagenet_lite0
    with pytest.raises(ValueError, match="'tulip'"):
        explain_image(model, metadata, flower_on_one_side("left"), "tulip")


def test_the_stored_crop_is_the_input_evaluation_gives_the_upload():
    """The API stores `crop_for_model` of the upload; the worker's tensor from it is the
    tensor evaluation makes from the upload itself."""
    metadata = metadata_for("efficientnet_lite0", 96, ["a", "b"])
    upload = Image.fromarray(load_sample_image("china.jpg"))
    expected = preprocess([upload], metadata)
    assert torch.equal(
        model_input(crop_for_model(upload, metadata), metadata), torch.tensor(expected)
    )


def test_a_multi_label_model_explains_its_most_probable_class_with_sigmoid_scores():
    classes = ["cat", "dog", "sky"]
    metadata = metadata_for("resnet18", 64, classes, thresholds=[0.5, 0.0, 1.0])
    torch.manual_seed(0)
    model = prepare(build_architecture(BACKBONES["resnet18"], 3))
    crop = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    _, prediction = explain_image(model, metadata, crop, None)
    with torch.no_grad():
        probs = torch.sigmoid(model(model_input(crop, metadata))[0])
    assert prediction["task"] == "multi-label"
    assert prediction["explained"]["label"] == classes[int(probs.argmax())]
    # Every class at or over its threshold, most probable first: never sky, always dog.
    assert "dog" in prediction["predicted"] and "sky" not in prediction["predicted"]
    assert prediction["top_k"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_has_a_target_layer_giving_a_heatmap_of_the_input_size(backbone):
    spec = BACKBONES[backbone]
    size = 224 if spec.arch.startswith("vit") else 64  # a ViT's patch grid is fixed
    torch.manual_seed(0)  # random weights, the same every run
    model = prepare(build_architecture(spec, 3))
    metadata = metadata_for(backbone, size, ["a", "b", "c"])
    crop = np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8)
    spreads = []
    for index in range(3):
        heatmap, logits = grad_cam(model, model_input(crop, metadata), index)
        assert heatmap.shape == (size, size) and logits.shape == (3,)
        assert np.isfinite(heatmap).all() and heatmap.min() >= 0 and heatmap.max() <= 1 + 1e-5
        spreads.append(float(heatmap.std()))
    # A spatial layer: the map varies over the image (a layer after pooling would be flat).
    # With random weights one class may have no positive evidence anywhere (a zero map).
    assert max(spreads) > 0.05, spreads


def test_a_model_served_with_flip_tta_is_explained_as_it_predicts(imagenet_lite0):
    """`"tta": "hflip"` in the metadata: predictions average the image and its mirror
    (core.inference), so the explanation reports those probabilities, explains the top
    class of that average, and its heatmap is the mean of the image's map and the mirror's
    map flipped back: mirroring the input mirrors the heatmap and leaves the prediction."""
    model, plain = imagenet_lite0
    metadata = {**plain, "tta": "hflip"}
    crop = flower_on_one_side("left")
    x = model_input(crop, metadata)
    with torch.no_grad():
        mean = (model(x)[0] + model(x.flip(-1))[0]) / 2
    probs = torch.softmax(mean, dim=0)
    _, prediction = explain_image(model, metadata, crop, None)
    assert prediction["tta"] == "hflip"
    assert prediction["explained"]["label"] == f"c{int(probs.argmax())}"
    for item in prediction["top_k"]:
        assert item["probability"] == pytest.approx(float(probs[int(item["label"][1:])]), abs=1e-5)
    _, untta = explain_image(model, plain, crop, None)
    assert untta["tta"] is None
    assert untta["top_k"][0]["probability"] != pytest.approx(
        prediction["top_k"][0]["probability"], abs=1e-4
    )

    heatmap, logits = flip_tta_grad_cam(model, x, None)
    mirrored, mirrored_logits = flip_tta_grad_cam(model, x.flip(-1), None)
    assert torch.allclose(logits, mean, atol=1e-4) and torch.allclose(
        logits, mirrored_logits, atol=1e-4
    )
    assert heatmap.max() == pytest.approx(1.0, abs=1e-4) and heatmap.min() >= 0
    assert np.abs(mirrored[:, ::-1] - heatmap).max() < 1e-3
    assert heatmap[:, :112].sum() / heatmap.sum() > 0.75  # still on the flower
    # Without TTA the map of the mirror is not the mirror of the map: the test can tell.
    single, _ = grad_cam(model, x, None)
    single_mirrored, _ = grad_cam(model, x.flip(-1), None)
    assert np.abs(single_mirrored[:, ::-1] - single).max() > 1e-2

"""The same contract for every registered backbone."""

import pytest
import torch

from core.backbones import BACKBONES, locate_weights
from core.settings import Settings
from worker.training.backbones import build_architecture, create_model
from worker.training.weights import WeightsSource

SETTINGS = Settings()


def _location(name):
    return locate_weights(
        BACKBONES[name], None, SETTINGS.resolved_torch_hub_dir, SETTINGS.resolved_hf_cache
    )


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_has_the_same_head_api(name):
    """Architecture only (random weights): runs for every backbone, weights or not."""
    model = build_architecture(BACKBONES[name], 1000)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    assert isinstance(model.group_matcher(coarse=True), dict)
    size = 224 if name.startswith("vit") else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model.forward_head(model.forward_features(x))
    assert feats.shape[0] == 2 and feats.ndim == 2
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_with_weights_builds_pretrained_for_three_classes(name):
    location = _location(name)
    if location is None:
        pytest.skip(
            f"no ImageNet weights for {name} on this host (no WEIGHTS_DIR file, "
            "torch/HF cache entry or package); `finetune weights pull` fetches them"
        )
    model = create_model(name, 3, weights=WeightsSource()).eval()
    size = 224 if name.startswith("vit") else 64
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3)


def test_packaged_lite_backbones_are_available_offline():
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        location = _location(name)
        assert location is not None and location.kind == "package", name


@pytest.mark.parametrize("name, size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite1_and_lite2_package_weights_map_onto_timm(name, size):
    import torchvision.transforms.v2 as T
    from PIL import Image
    from skimage import data

    model = create_model(name, 1000, keep_imagenet_head=True).eval()
    tf = T.Compose(
        [
            T.PILToTensor(),
            T.Resize((size, size)),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    with torch.no_grad():
        probs = model(tf(Image.fromarray(data.chelsea()))[None]).softmax(-1)[0]
    assert int(probs.argmax()) in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert float(probs[[281, 282, 285]].sum()) > 0.6

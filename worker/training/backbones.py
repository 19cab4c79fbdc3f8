"""One factory for every backbone, with one head API (timm's)."""

from __future__ import annotations

import logging

from torch import nn

from core.backbones import BACKBONES, BackboneSpec
from worker.training.weights import WeightsSource

log = logging.getLogger(__name__)


def build_architecture(spec: BackboneSpec, num_classes: int = 1000) -> nn.Module:
    """The network with random weights (used to rebuild a saved model)."""
    import timm

    return timm.create_model(spec.arch, pretrained=False, num_classes=num_classes)


def create_model(
    backbone: str,
    num_classes: int,
    pretrained: bool = True,
    weights: WeightsSource | None = None,
    keep_imagenet_head: bool = False,
) -> nn.Module:
    """ImageNet-pretrained `backbone` with a fresh `num_classes` head (or, with
    `keep_imagenet_head`, the original 1000-class classifier)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; available: {sorted(BACKBONES)}")
    spec = BACKBONES[backbone]
    model = build_architecture(spec, 1000)
    if pretrained:
        state, source = (weights or WeightsSource()).resolve(spec)
        model.load_state_dict(state, strict=True)
        log.info("%s: ImageNet weights from %s", backbone, source)
    if not keep_imagenet_head:
        model.reset_classifier(num_classes)  # type: ignore[operator]
    return model

"""One factory for every backbone, with one head API (timm's) whatever the library."""

from __future__ import annotations

import logging

import torch
from torch import nn

from core.backbones import BACKBONES, BackboneSpec
from worker.training.weights import WeightsSource

log = logging.getLogger(__name__)


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet behind timm's head API (`forward_features`, `forward_head`,
    `reset_classifier`, `num_classes`)."""

    def __init__(self, arch: str, num_classes: int = 1000):
        super().__init__()
        import torchvision

        self.net = torchvision.models.get_model(arch, weights=None, num_classes=1000)
        self.num_features = self.net.fc.in_features
        self.num_classes = 1000
        if num_classes != 1000:
            self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.net.fc = nn.Linear(self.num_features, num_classes)
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Module:
        return self.net.fc

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return {"stem": r"^net\.(?:conv1|bn1)", "blocks": r"^net\.layer(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.net.avgpool(x), 1)
        return x if pre_logits else self.net.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_architecture(spec: BackboneSpec, num_classes: int = 1000) -> nn.Module:
    """The network with random weights (used to rebuild a saved model)."""
    if spec.library == "torchvision":
        return TorchvisionResNet(spec.arch, num_classes)
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
        target = model.net if isinstance(model, TorchvisionResNet) else model
        target.load_state_dict(state, strict=True)
        log.info("%s: ImageNet weights from %s", backbone, source)
    if not keep_imagenet_head:
        model.reset_classifier(num_classes)  # type: ignore[operator]
    return model

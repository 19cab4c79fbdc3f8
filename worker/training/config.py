"""What a training run needs to know, independent of where the request came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from service.backbones import BACKBONES, BackboneSpec


@dataclass
class AugmentConfig:
    random_resized_crop: bool = True
    crop_scale_min: float = 0.35
    hflip: bool = True


@dataclass
class TrainConfig:
    backbone: str = "efficientnet_lite0"
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    image_size: int = 224
    val_fraction: float = 0.2
    seed: int = 0
    warmup_fraction: float = 0.1
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        aug = values.pop("augmentation", None) or {}
        aug_known = {f.name for f in fields(AugmentConfig)}
        return cls(
            **values, augmentation=AugmentConfig(**{k: v for k, v in aug.items() if k in aug_known})
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def spec(self) -> BackboneSpec:
        return BACKBONES[self.backbone]

    @property
    def resize_size(self) -> int:
        """Images are stored at this size; evaluation center-crops `image_size` out of it."""
        return int(round(self.image_size / self.spec.crop_pct))

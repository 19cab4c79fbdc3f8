"""What a training run needs to know, independent of where the request came from.

`service/schemas.py` validates the same fields at submit time (with the ranges); this is the
worker-side, typed view of the job's stored config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from service.backbones import BACKBONES, BackboneSpec

# Default backbone LR multiplier per strategy (head LR x this).
DEFAULT_BACKBONE_LR_MULT = {"full": 1.0, "lp_ft": 0.5, "gradual": 0.5, "linear_probe": 0.0}


@dataclass
class AugmentConfig:
    preset: str = "light"
    hflip: bool = True
    # An explicit list replaces the preset's image ops: [{"name": "...", ...params}].
    ops: list[dict[str, Any]] | None = None
    mixup_alpha: float | None = None  # None: the preset's (0.2 for strong)
    cutmix_alpha: float | None = None  # None: the preset's (1.0 for strong)


@dataclass
class EarlyStopping:
    metric: str = "val_accuracy"  # or val_loss, val_macro_f1
    patience: int = 3
    min_delta: float = 0.0


@dataclass
class TrainConfig:
    backbone: str = "efficientnet_lite0"
    strategy: str = "lp_ft"
    epochs: int = 5
    probe_epochs: int = 30  # head-only epochs on cached features (linear_probe, lp_ft)
    batch_size: int = 32
    learning_rate: float = 1e-3
    backbone_lr_mult: float | None = None
    # Keep BatchNorm on its running statistics while fine-tuning (None: on for lp_ft, whose
    # probed head was fitted to features computed that way).
    freeze_norm_stats: bool | None = None
    optimizer: str = "adamw"  # or sgd
    schedule: str = "cosine"  # cosine (with warmup), onecycle, step, constant
    warmup_epochs: float = 0.5
    weight_decay: float | None = None  # None: 0.05 for AdamW (decoupled), 1e-4 for SGD
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    image_size: int = 224
    val_fraction: float = 0.2
    seed: int = 0
    early_stopping: EarlyStopping | None = None
    class_balance: str = "auto"  # auto, none, weighted_loss, balanced_sampler
    imbalance_threshold: float = 3.0
    time_budget_seconds: float | None = None
    compile: bool = False
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        aug = values.pop("augmentation", None) or {}
        aug_known = {f.name for f in fields(AugmentConfig)}
        stop = values.pop("early_stopping", None)
        return cls(
            **values,
            augmentation=AugmentConfig(**{k: v for k, v in aug.items() if k in aug_known}),
            early_stopping=EarlyStopping(**stop) if stop else None,
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

    @property
    def effective_backbone_lr_mult(self) -> float:
        if self.backbone_lr_mult is not None:
            return self.backbone_lr_mult
        return DEFAULT_BACKBONE_LR_MULT[self.strategy]

    @property
    def effective_freeze_norm_stats(self) -> bool:
        if self.freeze_norm_stats is not None:
            return self.freeze_norm_stats
        return self.strategy == "lp_ft"

    @property
    def effective_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "sgd" else 0.05

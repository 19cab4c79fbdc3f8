"""Training transforms (torchvision.transforms.v2) from a preset or an explicit op list."""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms.v2 as T

from core.augmentations import CROP_OPS, FLIP_OPS, PRESET_MIXING, PRESETS
from core.jobspec import JobSpec


def resolved_ops(config: JobSpec) -> list[dict[str, Any]]:
    aug = config.augmentation
    ops = (
        [op.params() for op in aug.ops]
        if aug.ops is not None
        else [dict(op) for op in PRESETS[aug.preset]]
    )
    if not aug.hflip:
        ops = [op for op in ops if op["name"] not in FLIP_OPS]
    if not any(op["name"] in CROP_OPS for op in ops):
        ops.insert(0, {"name": "center_crop"})
    return ops


def _op(op: dict[str, Any], size: int) -> T.Transform:
    name = op["name"]
    if name == "random_resized_crop":
        scale = (float(op.get("scale_min", 0.08)), float(op.get("scale_max", 1.0)))
        return T.RandomResizedCrop(size, scale=scale, antialias=True)
    if name == "center_crop":
        return T.CenterCrop(size)
    if name == "random_crop":
        return T.Compose(
            [T.CenterCrop(size), T.RandomCrop(size, padding=int(op.get("padding", 4)))]
        )
    if name == "hflip":
        return T.RandomHorizontalFlip(float(op.get("p", 0.5)))
    if name == "vflip":
        return T.RandomVerticalFlip(float(op.get("p", 0.5)))
    if name == "rotation":
        return T.RandomRotation(float(op.get("degrees", 15)))
    if name == "color_jitter":
        return T.ColorJitter(
            brightness=float(op.get("brightness", 0.2)),
            contrast=float(op.get("contrast", 0.2)),
            saturation=float(op.get("saturation", 0.2)),
            hue=float(op.get("hue", 0.0)),
        )
    if name == "grayscale":
        return T.RandomGrayscale(float(op.get("p", 0.1)))
    if name == "gaussian_blur":
        return T.GaussianBlur(5, sigma=(0.1, float(op.get("sigma_max", 2.0))))
    if name == "trivial_augment":
        return T.TrivialAugmentWide()
    if name == "rand_augment":
        return T.RandAugment(
            num_ops=int(op.get("num_ops", 2)), magnitude=int(op.get("magnitude", 9))
        )
    if name == "auto_augment":
        return T.AutoAugment()
    raise ValueError(f"unknown augmentation op {name!r}")


def train_transform(config: JobSpec) -> T.Transform:
    """uint8 CHW (the cache's pre-resized image) -> normalized float tensor."""
    image_ops, after_normalize = [], []
    for op in resolved_ops(config):
        if op["name"] == "random_erasing":  # works on the normalized float tensor
            after_normalize.append(T.RandomErasing(float(op.get("p", 0.25)), value=0))
        else:
            image_ops.append(_op(op, config.input_size))
    return T.Compose(
        [
            *image_ops,
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(config.mean, config.std),
            *after_normalize,
        ]
    )


def eval_transform(config: JobSpec) -> T.Transform:
    return T.Compose(
        [
            T.CenterCrop(config.input_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(config.mean, config.std),
        ]
    )


def batch_mixing(config: JobSpec, num_classes: int) -> T.Transform | None:
    """MixUp/CutMix on whole batches (targets become soft), or None."""
    aug = config.augmentation
    mixup, cutmix = PRESET_MIXING.get(aug.preset, (0.0, 0.0)) if aug.ops is None else (0.0, 0.0)
    mixup = aug.mixup_alpha if aug.mixup_alpha is not None else mixup
    cutmix = aug.cutmix_alpha if aug.cutmix_alpha is not None else cutmix
    choices: list[T.Transform] = []
    if mixup > 0:
        choices.append(T.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(T.CutMix(alpha=cutmix, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else T.RandomChoice(choices)

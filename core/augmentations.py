"""Augmentation ops a job may ask for, as plain data (the API validates against this; the
worker builds torchvision.transforms.v2 from it in worker/training/augment.py)."""

from __future__ import annotations

# name -> {param: (min, max)}; every param is optional.
AUG_OPS: dict[str, dict[str, tuple[float, float]]] = {
    "random_resized_crop": {"scale_min": (0.01, 1.0), "scale_max": (0.01, 1.0)},
    "center_crop": {},
    "random_crop": {"padding": (0, 64)},
    "hflip": {"p": (0.0, 1.0)},
    "vflip": {"p": (0.0, 1.0)},
    "rotation": {"degrees": (0.0, 180.0)},
    "color_jitter": {
        "brightness": (0.0, 1.0),
        "contrast": (0.0, 1.0),
        "saturation": (0.0, 1.0),
        "hue": (0.0, 0.5),
    },
    "grayscale": {"p": (0.0, 1.0)},
    "gaussian_blur": {"sigma_max": (0.1, 10.0)},
    "trivial_augment": {},
    "rand_augment": {"num_ops": (1, 6), "magnitude": (0, 30)},
    "auto_augment": {},
    "random_erasing": {"p": (0.0, 1.0)},
}
CROP_OPS = {"random_resized_crop", "center_crop", "random_crop"}
FLIP_OPS = {"hflip"}

# What each preset expands to (before `hflip: false` removes the flip).
PRESETS: dict[str, list[dict[str, float | str]]] = {
    "none": [{"name": "center_crop"}],
    "light": [{"name": "random_resized_crop", "scale_min": 0.35}, {"name": "hflip"}],
    "standard": [
        {"name": "random_resized_crop", "scale_min": 0.25},
        {"name": "hflip"},
        {"name": "trivial_augment"},
        {"name": "random_erasing", "p": 0.25},
    ],
    "strong": [
        {"name": "random_resized_crop", "scale_min": 0.25},
        {"name": "hflip"},
        {"name": "trivial_augment"},
        {"name": "random_erasing", "p": 0.25},
    ],
}
# Batch-level mixing per preset: (mixup alpha, cutmix alpha).
PRESET_MIXING: dict[str, tuple[float, float]] = {"strong": (0.2, 1.0)}

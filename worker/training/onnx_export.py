"""The ONNX file in every model bundle, checked against PyTorch before it ships.

`export_onnx` writes `model.onnx` (one self-contained file, a dynamic batch dimension, input
`input` float32 NCHW normalised as `metadata.json` says, output `logits`) with torch.onnx's
maintained exporter (torch.export + onnxscript), falling back to the TorchScript-based one
only when the first cannot trace the model. It then runs the file in onnxruntime on the job's
validation images and compares with PyTorch: top-1 agreement and the largest absolute logit
difference go into `metadata.json` (`onnx`). A file that disagrees raises `OnnxMismatch`:
the caller ships the bundle without it and says why.

`quantize_int8` writes an optional `model.int8.onnx`: static QDQ quantization (per-channel
weights, activations calibrated on training images) with onnxruntime's own tools, and
measures what it costs: agreement with the fp32 file and validation accuracy of both.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
# The exporter's passes log every rewrite at INFO: thousands of lines per job otherwise.
for _name in ("onnxscript", "onnx_ir", "torch.onnx"):
    logging.getLogger(_name).setLevel(logging.WARNING)

OPSET = 18
INPUT, OUTPUT = "input", "logits"
# fp32 ONNX against fp32 PyTorch on the same CPU: kernels differ only in summation order.
MAX_LOGIT_DIFF = 1e-3
MIN_AGREEMENT = 1.0


class OnnxMismatch(RuntimeError):
    """The exported file does not compute what the PyTorch model computes."""


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Logits for `batch` (float32 NCHW), `chunk` images per call."""
    outs = [
        session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch[i : i + chunk])})[0]
        for i in range(0, len(batch), chunk)
    ]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _torch_logits(model: nn.Module, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
    with torch.no_grad():
        outs = [
            model(torch.from_numpy(batch[i : i + chunk])).float().numpy()
            for i in range(0, len(batch), chunk)
        ]
    return np.concatenate(outs)


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write `path`; return the exporter used."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - any tracing failure: try the older exporter
            log.warning(
                "torch.export could not export the model (%s); using the TorchScript exporter", exc
            )
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
            return "torchscript"


def export_onnx(
    model: nn.Module, input_size: int, path: Path, check_images: np.ndarray
) -> dict[str, Any]:
    """Export `model` (eval mode, on the CPU) to `path` and verify it on `check_images`
    (float32 NCHW, preprocessed as in evaluation). Returns what goes into metadata.json's
    `onnx`; raises OnnxMismatch when onnxruntime disagrees with PyTorch."""
    started = time.perf_counter()
    model = model.to("cpu").float().eval()
    example = torch.zeros(2, 3, input_size, input_size)
    exporter = _export(model, example, path)
    session = _session(path)
    if len(check_images) == 0:  # nothing held out: check on a blank and a noise image
        rng = np.random.default_rng(0)
        check_images = np.concatenate(
            [example.numpy(), rng.standard_normal((2, 3, input_size, input_size), np.float32)]
        )
    ours = run_onnx(session, check_images)
    ref = _torch_logits(model, check_images)
    agreement = float((ours.argmax(1) == ref.argmax(1)).mean())
    diff = float(np.abs(ours - ref).max())
    info = {
        "file": path.name,
        "opset": OPSET,
        "exporter": exporter,
        "input": INPUT,
        "output": OUTPUT,
        "dynamic_batch": True,
        "checked_images": int(len(check_images)),
        "top1_agreement": agreement,
        "max_abs_logit_diff": diff,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if agreement < MIN_AGREEMENT or not diff <= MAX_LOGIT_DIFF:
        raise OnnxMismatch(
            f"onnxruntime disagrees with PyTorch on {len(check_images)} validation images: "
            f"top-1 agreement {agreement:.4f} (needs {MIN_AGREEMENT:g}), largest logit "
            f"difference {diff:.2e} (allowed {MAX_LOGIT_DIFF:g})"
        )
    return info


class _Calibration:
    """onnxruntime's CalibrationDataReader over a float32 NCHW array."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._batches, None)
        return None if item is None else {INPUT: np.ascontiguousarray(item)}


def quantize_int8(
    fp32_path: Path,
    path: Path,
    calibration: np.ndarray,
    check_images: np.ndarray,
    check_labels: np.ndarray | None,
) -> dict[str, Any]:
    """Static int8 (QDQ, per-channel weights) from the verified fp32 file; its measured cost."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(fp32_path),
            str(path),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    fp32 = run_onnx(_session(fp32_path), check_images)
    int8 = run_onnx(_session(path), check_images)
    info: dict[str, Any] = {
        "file": path.name,
        "method": "static QDQ, per-channel int8 weights, uint8 activations (MinMax)",
        "calibration_images": int(len(calibration)),
        "checked_images": int(len(check_images)),
        "top1_agreement_with_fp32": float((fp32.argmax(1) == int8.argmax(1)).mean()),
        "bytes": path.stat().st_size,
        "fp32_bytes": fp32_path.stat().st_size,
    }
    if check_labels is not None and len(check_labels):
        acc32 = float((fp32.argmax(1) == check_labels).mean())
        acc8 = float((int8.argmax(1) == check_labels).mean())
        info.update(fp32_accuracy=acc32, int8_accuracy=acc8, accuracy_change=acc8 - acc32)
    info["seconds"] = round(time.perf_counter() - started, 3)
    return info


# Flip TTA ships only when it measurably helps: at least this much accuracy on the checked
# validation images and a lower loss (one image of 256 is 0.4 points; noise must not win).
TTA_MIN_GAIN = 0.005


def flip_tta_check(path: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy and log loss on `images` with and without averaging in their mirror images,
    and whether the model should be served that way (`use`)."""
    session = _session(path)
    plain = run_onnx(session, images).astype(np.float64)
    flipped = run_onnx(session, np.ascontiguousarray(images[..., ::-1])).astype(np.float64)
    both = (plain + flipped) / 2

    def scores(logits: np.ndarray) -> tuple[float, float]:
        shifted = logits - logits.max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        acc = float((logits.argmax(1) == labels).mean())
        return acc, float(-logp[np.arange(len(labels)), labels].mean())

    (acc, loss), (acc_tta, loss_tta) = scores(plain), scores(both)
    return {
        "checked_images": int(len(labels)),
        "accuracy": acc,
        "accuracy_hflip": acc_tta,
        "loss": loss,
        "loss_hflip": loss_tta,
        "use": bool(acc_tta >= acc + TTA_MIN_GAIN and loss_tta < loss),
    }

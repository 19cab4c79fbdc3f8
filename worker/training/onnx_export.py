"""The ONNX file in every model bundle, checked against PyTorch before it ships.

`export_onnx` writes `model.onnx` (one self-contained file, a dynamic batch dimension, input
`input` float32 NCHW normalised as `metadata.json` says, output `logits`). The exporters are
tried in `EXPORTERS` order: torch.onnx's TorchScript-based one first (deprecated upstream but
still shipped, and 10-15 times faster on this CPU: about 0.5 s for lite0 against 7 s), then
the maintained one (torch.export + onnxscript) when the first fails, is gone, or its file
fails the check. Either file is verified the same way: onnxruntime runs every check image
(the job's validation images), PyTorch runs the `VERIFY_IMAGES` of them with the smallest
top-1 margin in onnxruntime (the ones a small numerical difference could flip; every image
whose margin is under twice the allowed difference, however many) and a single image alone
(the dynamic batch). Top-1 agreement and the largest absolute logit difference go into
`metadata.json` (`onnx`). A file that disagrees raises `OnnxMismatch`: the caller ships the
bundle without it and says why.

A difference over `MAX_LOGIT_DIFF` with the same top-1 everywhere gets a second opinion: PyTorch
runs the `FP64_IMAGES` worst images again in float64, and the file passes when onnxruntime is
as close to that exact answer as PyTorch's own float32 is (within `MAX_LOGIT_DIFF` plus
`FP64_FACTOR` times PyTorch's error). Both float32 results round; where the head cancels large
terms (ViT-B with a least-squares head: 1.2e-3 apart, each 1e-3 from float64) neither is wrong,
while a file that computes something else stays orders of magnitude further away.

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
# float64 second opinion: the images furthest apart; onnxruntime's allowed error, x PyTorch's
FP64_IMAGES, FP64_FACTOR = 8, 4.0  # onnxruntime/PyTorch: ViT-B 0.9, tiny ViT 1.4-2.4 by CPU
# PyTorch is the slow side of the check (about 0.1 s a 224 px image for lite0 on one thread,
# four times onnxruntime): it runs this many of the check images, the least certain ones.
VERIFY_IMAGES = 64
EXPORTERS = ("torchscript", "dynamo")  # tried in this order
# onnxruntime's default, as core/inference.py serves: on ViT-B the closest and fastest level.
GRAPH_OPTIMIZATION = "ORT_ENABLE_ALL"


class OnnxMismatch(RuntimeError):
    """The exported file does not compute what the PyTorch model computes."""


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION)
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


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
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


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
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


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


# Besides the least certain rows, this many drawn at random (fixed seed): a mistake only some
# inputs hit (a traced branch) is often confidently wrong, with a large margin.
RANDOM_CHECKED = 16


def _least_certain(logits: np.ndarray, count: int) -> tuple[np.ndarray, float | None]:
    """(positions of the `count` rows with the smallest top-1 margin, of every row whose
    margin is under 2 * MAX_LOGIT_DIFF, and of RANDOM_CHECKED more drawn with a fixed seed,
    in order; the smallest margin left out, or None)."""
    if len(logits) <= count + RANDOM_CHECKED or logits.shape[1] < 2:
        return np.arange(len(logits)), None
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    order = np.argsort(margin, kind="stable")
    k = max(count, int((margin < 2 * MAX_LOGIT_DIFF).sum()))
    rest = order[k:]
    drawn = np.random.default_rng(0).choice(rest, min(RANDOM_CHECKED, len(rest)), replace=False)
    unchecked = np.setdiff1d(rest, drawn)
    left = float(margin[unchecked].min()) if len(unchecked) else None
    return np.sort(np.concatenate([order[:k], drawn])), left


def _fp64_check(
    model: nn.Module, images: np.ndarray, ours: np.ndarray, ref: np.ndarray
) -> dict[str, Any]:
    """How far onnxruntime's (`ours`) and PyTorch's float32 logits (`ref`) of `images` are
    from PyTorch's in float64, and whether onnxruntime is close enough (`ok`)."""
    try:  # float32 -> float64 -> float32 is exact: the model comes back unchanged
        with torch.no_grad():
            exact = model.double()(torch.from_numpy(images).double()).numpy()
    finally:
        model.float()
    ort_error = float(np.abs(ours - exact).max())
    torch_error = float(np.abs(ref - exact).max())
    allowed = MAX_LOGIT_DIFF + FP64_FACTOR * torch_error
    return {
        "images": int(len(images)),
        "onnxruntime_error": ort_error,
        "pytorch_fp32_error": torch_error,
        "allowed": allowed,
        "ok": bool(ort_error <= allowed),
    }


def _check(
    model: nn.Module, path: Path, images: np.ndarray, verify: int
) -> tuple[dict[str, Any], np.ndarray]:
    """(the check's figures, onnxruntime's logits of every image); OnnxMismatch when the
    file disagrees with PyTorch."""
    session = _session(path)
    ours = run_onnx(session, images)
    if not np.isfinite(ours).all():  # NaN or inf sorts last: no margin would pick it
        bad = int((~np.isfinite(ours).all(axis=1)).sum())
        raise OnnxMismatch(
            f"onnxruntime returned NaN or infinite logits for {bad} of {len(ours)} "
            "validation images"
        )
    picked, unchecked_margin = _least_certain(ours, verify)
    ref = _torch_logits(model, images[picked])
    checked = ours[picked]  # with the batch-1 answer (the dynamic dimension) when further off
    alone = run_onnx(session, images[picked[:1]])
    far = np.abs(alone - ref[:1]).max() > np.abs(checked[:1] - ref[:1]).max()
    if far or not np.isfinite(alone).all():
        checked = np.concatenate([alone, checked[1:]])
    agreement = float((checked.argmax(1) == ref.argmax(1)).mean())
    rows = np.abs(checked - ref).max(axis=1)
    diff = float(np.nan_to_num(rows, nan=np.inf).max())
    fp64 = None
    if agreement >= MIN_AGREEMENT and not diff <= MAX_LOGIT_DIFF and np.isfinite(ref).all():
        worst = np.argsort(-rows, kind="stable")[:FP64_IMAGES]
        try:
            fp64 = _fp64_check(model, images[picked[worst]], checked[worst], ref[worst])
        except Exception as exc:  # noqa: BLE001 - no float64 kernel: the plain bound holds
            log.warning("the float64 check of the ONNX file could not run: %s", exc)
    if agreement < MIN_AGREEMENT or not (diff <= MAX_LOGIT_DIFF or (fp64 and fp64["ok"])):
        second = (
            f"; in float64 on {fp64['images']} of them onnxruntime is "
            f"{fp64['onnxruntime_error']:.2e} away, PyTorch's float32 "
            f"{fp64['pytorch_fp32_error']:.2e} (allowed {fp64['allowed']:.2e})"
            if fp64
            else ""
        )
        raise OnnxMismatch(
            f"onnxruntime disagrees with PyTorch on {len(picked)} validation images: "
            f"top-1 agreement {agreement:.4f} (needs {MIN_AGREEMENT:g}), largest logit "
            f"difference {diff:.2e} (allowed {MAX_LOGIT_DIFF:g}){second}"
        )
    info = {
        "onnx_images": int(len(images)),
        "checked_images": int(len(picked)),
        "checked": "the images with the smallest top-1 margin in onnxruntime, and one alone",
        "smallest_unchecked_margin": unchecked_margin,
        "top1_agreement": agreement,
        "max_abs_logit_diff": diff,
        "graph_optimization": GRAPH_OPTIMIZATION,
    }
    if fp64:  # the float64 second opinion accepted a difference over MAX_LOGIT_DIFF
        info["fp64_check"] = {k: v for k, v in fp64.items() if k != "ok"}
    return info, ours


def export_and_check(
    model: nn.Module,
    input_size: int,
    path: Path,
    check_images: np.ndarray,
    *,
    verify: int = VERIFY_IMAGES,
    exporters: tuple[str, ...] = EXPORTERS,
) -> tuple[dict[str, Any], np.ndarray]:
    """`export_onnx`, also returning onnxruntime's logits of every check image (for the
    checks that follow: flip TTA, int8, without running the file again). Each exporter in
    turn until one gives a file that agrees with PyTorch."""
    started = time.perf_counter()
    model = model.to("cpu").float().eval()
    example = torch.zeros(2, 3, input_size, input_size)
    if len(check_images) == 0:  # nothing held out: check on a blank and a noise image
        rng = np.random.default_rng(0)
        check_images = np.concatenate(
            [example.numpy(), rng.standard_normal((2, 3, input_size, input_size), np.float32)]
        )
    failures: list[str] = []
    disagreed = False
    for name in exporters:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _EXPORTERS[name](model, example, path)
            exported = time.perf_counter()
            checked, logits = _check(model, path, check_images, verify)
        except Exception as exc:  # noqa: BLE001 - tracing failed or the file disagrees
            disagreed = disagreed or isinstance(exc, OnnxMismatch)
            log.warning("the %s ONNX exporter's file is not shipped: %s", name, exc)
            failures.append(f"{name} exporter: {type(exc).__name__}: {exc}")
            path.unlink(missing_ok=True)
            continue
        info = {
            "file": path.name,
            "opset": OPSET,
            "exporter": name,
            "input": INPUT,
            "output": OUTPUT,
            "dynamic_batch": True,
            **checked,
            "export_seconds": round(exported - started, 3),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if failures:
            info["failed_exporters"] = failures
        return info, logits
    message = "no ONNX exporter gave a file that agrees with PyTorch: " + "; ".join(failures)
    raise OnnxMismatch(message) if disagreed else RuntimeError(message)


def export_onnx(
    model: nn.Module, input_size: int, path: Path, check_images: np.ndarray, **options: Any
) -> dict[str, Any]:
    """Export `model` (eval mode, on the CPU) to `path` and verify it on `check_images`
    (float32 NCHW, preprocessed as in evaluation). Returns what goes into metadata.json's
    `onnx`; raises OnnxMismatch when onnxruntime disagrees with PyTorch. `options`: those
    of `export_and_check`."""
    return export_and_check(model, input_size, path, check_images, **options)[0]


class _Calibration:
    """onnxruntime's CalibrationDataReader over a float32 NCHW array."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._batches, None)
        return None if item is None else {INPUT: np.ascontiguousarray(item)}


def _quantize(fp32_path: Path, path: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(fp32_path),
            str(path),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # 7-bit weights: without VNNI (AVX2 only) u8s8 saturates at 8 bits, as onnxruntime
            # warns; 32-px digits then lost 37 points to int8, 7 bits lose 7 (BENCHMARKS.md).
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def quantize_int8(
    fp32_path: Path,
    path: Path,
    calibration: np.ndarray,
    check_images: np.ndarray,
    check_labels: np.ndarray | None,
    fp32_logits: np.ndarray | None = None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Static int8 (QDQ, per-channel weights) from the verified fp32 file; its measured cost.
    `fp32_logits`: the fp32 file's logits of `check_images` when the caller has them.

    With `model`, a file the quantized copy of which onnxruntime cannot run (seen: the
    TorchScript exporter's EfficientNet at 32 px, a depthwise QLinearConv on a 2x2 map) is
    quantized again from the maintained exporter's file, verified first as the fp32 one was."""
    started = time.perf_counter()
    source = "the shipped fp32 file"
    try:
        _quantize(fp32_path, path, calibration)
        int8 = run_onnx(_session(path), check_images)
    except Exception as exc:  # noqa: BLE001 - retried from the other exporter's file
        if model is None:
            raise
        log.warning("int8 from %s failed (%s); quantizing a dynamo export", fp32_path.name, exc)
        other = path.with_name(f"{fp32_path.stem}.dynamo.onnx")
        try:
            export_and_check(
                model, int(calibration.shape[-1]), other, check_images, exporters=("dynamo",)
            )
            _quantize(other, path, calibration)
            int8 = run_onnx(_session(path), check_images)
        finally:
            other.unlink(missing_ok=True)
        source = f"a dynamo export (from the shipped file: {type(exc).__name__})"
    fp32 = run_onnx(_session(fp32_path), check_images) if fp32_logits is None else fp32_logits
    info: dict[str, Any] = {
        "file": path.name,
        "method": "static QDQ, per-channel int8 weights (7-bit range), uint8 activations (MinMax)",
        "quantized_from": source,
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


def flip_tta_check(
    path: Path, images: np.ndarray, labels: np.ndarray, plain: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy and log loss on `images` with and without averaging in their mirror images,
    and whether the model should be served that way (`use`). `plain`: the file's logits of
    `images` when the caller has them (the export's check ran them)."""
    session = _session(path)
    plain = (run_onnx(session, images) if plain is None else plain).astype(np.float64)
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

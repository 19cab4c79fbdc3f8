"""The ONNX export of every backbone, checked as a job checks it (issue 13's targets).

For each backbone: ImageNet weights when this host has them (else the same architecture
with random weights, said in the table: the exporter sees the same graph), a 10-class head
fitted in one step of least squares on pooled features so the logits are not all alike,
exported at its default input size with `worker.training.onnx_export.export_onnx`, then
compared with PyTorch on real images (scikit-image's `data` pictures and scikit-learn's
digits, resized and normalised as in evaluation): top-1 agreement (target 100%) and the
largest absolute logit difference (target <= 1e-3, or onnxruntime about as close to a
float64 PyTorch run as PyTorch's float32 is: the "fp64" figures, `onnx.fp64_check`). With
`--int8`, the static int8 copy's agreement with fp32 and its size.

With `--compare`, what a job pays after training, the old way and the new way in the same
run, per backbone: the export, its check and the flip-TTA check on `--images` images (a job
checks up to 256 validation images). Old: the dynamo exporter, PyTorch on every image, the
TTA check running the plain images again. New: the exporters in `EXPORTERS` order, PyTorch
on the `VERIFY_IMAGES` least certain images, the TTA check reusing the export's logits.

    .venv/bin/python benchmarks/onnx_export.py [--backbones a,b] [--images 64] [--int8]
        [--smoke] [--compare]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core import imaging  # noqa: E402
from core.backbones import BACKBONES  # noqa: E402
from core.jobspec import JobSpec  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.weights import weights_on_host  # noqa: E402
from worker.training.backbones import create_model  # noqa: E402
from worker.training.export import build_metadata  # noqa: E402
from worker.training.onnx_export import (  # noqa: E402
    OnnxMismatch,
    export_and_check,
    export_onnx,
    flip_tta_check,
    quantize_int8,
)


def real_images(n: int) -> list[Image.Image]:
    from skimage import data
    from sklearn.datasets import load_digits

    pictures = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon"):
        arr = getattr(data, name)()
        pictures.append(Image.fromarray(arr))
    digits = load_digits().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if i % 2 == 0:  # a random crop of a picture
            img = pictures[i // 2 % len(pictures)]
            w, h = img.size
            s = int(min(w, h) * rng.uniform(0.3, 1.0))
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            out.append(img.crop((x, y, x + s, y + s)))
        else:
            d = (digits[i % len(digits)] * 16).clip(0, 255).astype(np.uint8)
            out.append(Image.fromarray(d))
    return out


def compare(
    model: torch.nn.Module, size: int, path: Path, batch: np.ndarray, labels: np.ndarray
) -> dict[str, object]:
    """Seconds for the export, its check and the TTA check: the old way, then the new."""
    started = time.perf_counter()
    old, _ = export_and_check(model, size, path, batch, verify=len(batch), exporters=("dynamo",))
    flip_tta_check(path, batch, labels)
    old_s = time.perf_counter() - started
    started = time.perf_counter()
    new, logits = export_and_check(model, size, path, batch)
    flip_tta_check(path, batch, labels, logits)
    new_s = time.perf_counter() - started
    return {
        "images": len(batch),
        "old_s": old_s,
        "old_export_s": old["export_seconds"],
        "old_diff": old["max_abs_logit_diff"],
        "new_s": new_s,
        "new_export_s": new["export_seconds"],
        "new_exporter": new["exporter"],
        "new_checked": new["checked_images"],
        "new_diff": new["max_abs_logit_diff"],
        "new_agreement": new["top1_agreement"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="lite0 at 64 px, 8 images")
    parser.add_argument("--compare", action="store_true", help="old and new way, same run")
    args = parser.parse_args()
    names = args.backbones.split(",")
    size_override = None
    if args.smoke:
        names, args.images, size_override = ["efficientnet_lite0"], 8, 64
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = Settings(database_url="", broker_url="")
    pictures = real_images(args.images)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.compare:  # both exporters' first-call imports, paid once by a worker process
            tiny = torch.nn.Sequential(
                torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)
            )
            tiny(torch.zeros(1, 3, 8, 8))
            for exporter in ("dynamo", "torchscript"):
                export_onnx(
                    tiny.eval(), 8, Path(tmp) / "warm.onnx", np.zeros((0,)), exporters=(exporter,)
                )
        for name in names:
            spec = BACKBONES[name]
            pretrained = weights_on_host(spec, settings) is not None
            model = create_model(name, 10, pretrained=pretrained).eval()
            config = JobSpec(backbone=name, image_size=size_override or spec.input_size)
            meta = build_metadata(config, [str(i) for i in range(10)], {}, {})
            batch = imaging.preprocess(pictures, meta)
            with torch.no_grad():  # a head that separates the pictures: distinct logits
                feats = model.forward_head(
                    model.forward_features(torch.from_numpy(batch)), pre_logits=True
                )
                target = torch.nn.functional.one_hot(torch.arange(len(batch)) % 10, 10).float()
                w = torch.linalg.lstsq(feats, target).solution
                head = model.get_classifier()
                head.weight.copy_(w.T * 10)
                head.bias.zero_()
            path = Path(tmp) / f"{name}.onnx"
            if args.compare:
                labels = np.arange(len(batch)) % 10
                row = {"backbone": name, "weights": "ImageNet" if pretrained else "random"}
                row["size"] = config.input_size
                row |= compare(model, config.input_size, path, batch, labels)
                rows.append(row)
                print(row, flush=True)
                continue
            started = time.perf_counter()
            try:
                info = export_onnx(model, config.input_size, path, batch)
                ok = "yes"
            except OnnxMismatch as exc:
                info, ok, failed = {"error": str(exc)}, "NO", failed + 1
            row = {
                "backbone": name,
                "weights": "ImageNet" if pretrained else "random",
                "size": config.input_size,
                "export_s": time.perf_counter() - started,
                "ok": ok,
                **info,
            }
            if args.int8 and ok == "yes":
                q = quantize_int8(path, Path(tmp) / f"{name}.int8.onnx", batch[:32], batch, None)
                row["int8_agree"] = q["top1_agreement_with_fp32"]
                row["int8_ratio"] = q["bytes"] / q["fp32_bytes"]
            rows.append(row)
            print(row, flush=True)
    print()
    if args.compare:
        print(
            "| backbone | weights | px | old: dynamo, all checked, s | new: exporter "
            "| new s | new / old | new: images PyTorch checked | new: max abs logit diff |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['backbone']} | {r['weights']} | {r['size']} | {r['old_s']:.1f} "
                f"| {r['new_exporter']} | {r['new_s']:.1f} | {r['new_s'] / r['old_s']:.2f} "
                f"| {r['new_checked']} of {r['images']} | {r['new_diff']:.1e} |"
            )
        return
    print(
        "| backbone | weights | px | exporter | export s | top-1 agreement | max abs logit diff |"
        + (" int8 agreement | int8 size |" if args.int8 else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.int8 else ""))
    for r in rows:
        agree = f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "FAILED"
        diff = f"{r['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in r else r["error"]
        if "fp64_check" in r:  # over 1e-3, accepted on the float64 second opinion
            f64 = r["fp64_check"]
            diff += (
                f" (fp64: onnxruntime {f64['onnxruntime_error']:.1e}, PyTorch fp32 "
                f"{f64['pytorch_fp32_error']:.1e})"
            )
        line = (
            f"| {r['backbone']} | {r['weights']} | {r['size']} | {r.get('exporter', '-')} "
            f"| {r['export_s']:.1f} | {agree} | {diff} |"
        )
        if args.int8:
            line += f" {100 * r.get('int8_agree', 0):.1f}% | {r.get('int8_ratio', 0):.2f}× |"
        print(line)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The GPU training path: images/s and peak memory of one training step, fp32 vs
channels-last vs bf16/fp16 autocast, and the path the worker actually takes.

The worker (`worker/training/loop.py`) trains with channels-last inputs and weights on every
device (the CPU gains too: `--device cpu`) and, for the backbones that gain from it,
autocast in `amp_dtype_for(device, backbone)` (bf16 where supported, else fp16 with a
GradScaler; `gpu_autocast` in `core/backbones.py`). Autocast
variants of a backbone without `gpu_autocast` are skipped unless `--all-variants` (lite0's
bf16 did not finish 25 steps in 70 s on an H200). cuDNN runs as in the worker: no
`cudnn.benchmark` (the first H200 figures, 2026-11-29, were taken with it on). This
script times each ingredient separately on the same model and batch, within one run, so the
ratios are comparable; then it times `train_one_epoch` itself on synthetic batches.

    .venv/bin/python benchmarks/gpu_path.py                      # on the GPU
    .venv/bin/python benchmarks/gpu_path.py --device cpu --image-size 64 --steps 3   # smoke

Prints a Markdown table; `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from core.backbones import BACKBONES  # noqa: E402
from worker.training.backbones import create_model  # noqa: E402
from worker.training.callbacks import Callbacks  # noqa: E402
from worker.training.loop import train_one_epoch  # noqa: E402
from worker.training.runtime import amp_dtype_for  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variant_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype | None,
    channels_last: bool,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    device = x.device
    model = model.to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "images_per_second": round(steps * x.shape[0] / seconds, 1),
        "peak_memory_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20)
            if device.type == "cuda"
            else None
        ),
    }


def worker_path(
    backbone: str, device: torch.device, batch: int, size: int, steps: int, classes: int
) -> dict[str, Any]:
    """`train_one_epoch` as the worker calls it, on synthetic uint8-like batches."""
    # As `fit` places it: channels-last on every device.
    model = create_model(backbone, classes, pretrained=False).to(device)
    model = model.to(memory_format=torch.channels_last)
    amp = amp_dtype_for(device, backbone)
    n = batch * steps
    data = TensorDataset(torch.randn(n, 3, size, size), torch.randint(0, classes, (n,)))
    loader = DataLoader(data, batch_size=batch, pin_memory=device.type == "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    args = (model, loader, opt, sched, nn.CrossEntropyLoss(), device, 1, Callbacks(), amp, scaler)
    train_one_epoch(*args)  # warm-up epoch (cuDNN autotuning, allocator)
    stats = train_one_epoch(*args)
    return {
        "amp_dtype": str(amp).replace("torch.", "") if amp else "fp32",
        "images_per_second": round(stats.images_per_second, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: does it run")
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help="also the autocast variants of a backbone that trains without autocast",
    )
    args = parser.parse_args()
    if args.smoke:
        args.backbone, args.batch_size, args.image_size = "efficientnet_lite0", 4, 64
        args.steps, args.warmup = 2, 1
    device = torch.device(args.device)
    classes = 10
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, classes, (args.batch_size,), device=device)
    variants: list[tuple[str, torch.dtype | None, bool]] = [
        ("fp32", None, False),
        ("fp32 + channels_last", None, True),
        ("bf16 autocast + channels_last", torch.bfloat16, True),
    ]
    if device.type == "cuda":
        variants.append(("fp16 autocast + GradScaler + channels_last", torch.float16, True))
        if not BACKBONES[args.backbone].gpu_autocast and not args.all_variants:
            variants = [v for v in variants if v[1] is None]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "torch": torch.__version__,
        "variants": {},
    }
    print(
        f"device: {results['device']}, {args.backbone}, batch {args.batch_size}, "
        f"{args.image_size}px, torch {torch.__version__}",
        flush=True,
    )
    for name, dtype, cl in variants:
        torch.manual_seed(0)
        model = create_model(args.backbone, classes, pretrained=False).to(device)
        results["variants"][name] = variant_step(model, x, y, dtype, cl, args.steps, args.warmup)
        print(f"  measured {name}: {results['variants'][name]}", flush=True)  # a hang keeps these
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["worker_path"] = worker_path(
        args.backbone, device, args.batch_size, args.image_size, args.steps, classes
    )
    base = results["variants"]["fp32"]["images_per_second"]
    print("| variant | images/s | vs fp32 | peak MiB |\n|---|---|---|---|")
    for name, r in results["variants"].items():
        print(
            f"| {name} | {r['images_per_second']} | {r['images_per_second'] / base:.2f} | "
            f"{r['peak_memory_mib']} |"
        )
    wp = results["worker_path"]
    print(
        f"| worker `train_one_epoch` ({wp['amp_dtype']}) | {wp['images_per_second']} | "
        f"{wp['images_per_second'] / base:.2f} | |"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

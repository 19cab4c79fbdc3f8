"""How long a Grad-CAM explanation takes on this CPU, once the model is loaded (issue 13's
target: an overlay for lite0 at 224 px within 2 s).

EfficientNet-Lite0 with its packaged ImageNet weights and a fresh 10-class head (what a
job's model is, before training moves the head), written to a local object store as a job
leaves it (model.safetensors + metadata.json). Then, in one process:

- the model's load as the light worker does it (`worker.explain.cached_model`: from the
  store, no unpickling), cold;
- the API's share: decoding a JPEG upload and cropping it to the model's input
  (`core.imaging.decode_upload` + `crop_for_model`);
- the worker's explanation (`worker.explain.explain_image`: the forward and backward pass,
  Grad-CAM, the overlay and its PNG), the median of --runs, with torch's default threads
  and with one thread (a light worker on a busy host).

    .venv/bin/python benchmarks/explain_latency.py [--runs 20] [--smoke]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_SECONDS = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="explanations timed per setting")
    parser.add_argument("--size", type=int, default=224, help="the model's input size")
    parser.add_argument("--smoke", action="store_true", help="3 runs: does it run")
    args = parser.parse_args()
    runs = 3 if args.smoke else args.runs

    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from sklearn.datasets import load_sample_image

    from core.imaging import crop_for_model, decode_upload
    from core.jobspec import JobSpec
    from core.storage import LocalObjectStore
    from worker.explain import cached_model, explain_image
    from worker.training.backbones import create_model
    from worker.training.export import build_metadata

    classes = [f"class_{i}" for i in range(10)]
    config = JobSpec(backbone="efficientnet_lite0", image_size=args.size)
    torch.manual_seed(0)
    model = create_model(config.backbone, len(classes))  # ImageNet weights, random head
    metadata = build_metadata(config, classes, {}, {})
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalObjectStore(Path(tmp) / "objects")
        files = Path(tmp) / "model"
        files.mkdir()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(files / "model.safetensors"))
        (files / "metadata.json").write_text(json.dumps(metadata))
        result = {
            "safetensors_key": "jobs/bench/model/model.safetensors",
            "metadata_key": "jobs/bench/model/metadata.json",
        }
        store.put_file(result["safetensors_key"], files / "model.safetensors")
        store.put_file(result["metadata_key"], files / "metadata.json")
        started = time.perf_counter()
        loaded, loaded_metadata = cached_model(store, result)
        load_seconds = time.perf_counter() - started

    upload = io.BytesIO()
    Image.fromarray(load_sample_image("flower.jpg")).save(upload, format="JPEG", quality=90)
    started = time.perf_counter()
    crop = crop_for_model(decode_upload(upload.getvalue(), 40_000_000), loaded_metadata)
    api_seconds = time.perf_counter() - started

    threads_default = torch.get_num_threads()
    figures: dict[str, list[float]] = {}
    for threads in sorted({threads_default, 1}, reverse=True):
        torch.set_num_threads(threads)
        explain_image(loaded, loaded_metadata, crop, None)  # warm-up: lazy imports, allocator
        times = []
        for i in range(runs):
            target = None if i % 2 == 0 else classes[i % len(classes)]
            started = time.perf_counter()
            png, prediction = explain_image(loaded, loaded_metadata, crop, target)
            times.append(time.perf_counter() - started)
        figures[f"{threads} thread{'s' if threads > 1 else ''}"] = times
        assert Image.open(io.BytesIO(png)).size == (args.size, args.size)
    torch.set_num_threads(threads_default)

    print(f"lite0 at {args.size} px, {runs} explanations per setting, torch {torch.__version__}")
    print(f"model load from the store (cold): {load_seconds:.3f} s")
    print(f"API decode + crop of a 640x427 JPEG: {api_seconds * 1000:.1f} ms")
    worst = 0.0
    for name, times in figures.items():
        median = statistics.median(times)
        worst = max(worst, median)
        print(
            f"explain, {name}: median {median:.3f} s, min {min(times):.3f} s, "
            f"max {max(times):.3f} s"
        )
    verdict = "within" if worst <= TARGET_SECONDS else "OVER"
    print(f"slowest median {worst:.3f} s: {verdict} the {TARGET_SECONDS:.0f} s target")
    return 0 if worst <= TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())

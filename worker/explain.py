"""Explain a trained model's prediction for one image with a Grad-CAM overlay.

Runs as the `finetune.explain` task on the light queue. The API (which never imports torch)
stored the model's input next to the explanation's key (see `service/explanations.py` and
`core.queue.explanation_key`): the centre crop of the upload at the model's input size, as
evaluation makes it. This writes `<key>.png` (the heatmap over that crop) and then
`<key>.json` (the prediction: its presence means done), or `<key>.error.json` when it failed
for good; either way the API's `<key>.pending` marker is removed.

Grad-CAM is pytorch-grad-cam's, on the layer whose output is the last spatial feature map
each architecture pools (`target_layers`). Models are loaded from the store (safetensors and
metadata.json, no unpickling) and kept in a small per-process LRU: a light worker explaining
a few models in turn loads each once.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from core.db import session_scope
from core.imaging import preprocess
from core.models import Job
from core.queue import explanation_key
from core.settings import Settings, get_settings
from core.storage import ObjectStore, StorageNotFound, get_store
from worker.failures import is_transient
from worker.training.export import load_model

log = logging.getLogger(__name__)

TOP_K = 5
MODELS_KEPT = 3  # per worker process; a ViT-B is ~350 MB, a lite0 ~20 MB
_models: OrderedDict[str, tuple[nn.Module, dict[str, Any]]] = OrderedDict()
_models_lock = threading.Lock()

Reshape = Callable[[torch.Tensor], torch.Tensor] | None


def target_layers(model: nn.Module) -> tuple[list[nn.Module], Reshape]:
    """The layer Grad-CAM weighs, for each architecture in `core.backbones`: the last
    feature map before global pooling (for EfficientNets, `bn2`, the head's conv after its
    norm and activation; MobileNetV3 pools before its conv_head, so its last block). A ViT
    has tokens, not a map: the last block's norm1, its patch tokens laid back on their grid."""
    kind = type(model).__name__

    def last(name: str) -> nn.Module:
        return list(model.get_submodule(name).children())[-1]

    if kind == "EfficientNet":
        return [model.get_submodule("bn2")], None
    if kind == "MobileNetV3":
        return [last("blocks")], None
    if kind == "ResNet":
        return [model.get_submodule("layer4")], None
    if kind == "ConvNeXt":
        return [last("stages")], None
    if kind == "VisionTransformer":
        prefix = int(getattr(model, "num_prefix_tokens"))  # noqa: B009 (not typed on Module)
        height, width = getattr(model.get_submodule("patch_embed"), "grid_size")  # noqa: B009

        def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
            grid = tokens[:, prefix:, :].reshape(tokens.size(0), height, width, tokens.size(2))
            return grid.permute(0, 3, 1, 2)

        return [last("blocks").get_submodule("norm1")], tokens_to_map
    raise ValueError(f"no Grad-CAM target layer known for a {kind} model")


def model_input(crop: np.ndarray, metadata: dict[str, Any]) -> torch.Tensor:
    """The normalized 1x3xSxS tensor for an SxS crop already made as evaluation makes it
    (`core.imaging.crop_for_model`): `preprocess` with the crop as its own resize, which
    leaves it as it is, then normalizes with the model's mean and std."""
    size = int(metadata["input_size"][1])
    if crop.shape != (size, size, 3):
        raise ValueError(f"the stored input is {crop.shape}, the model takes {size}x{size} RGB")
    image = Image.fromarray(crop)
    return torch.from_numpy(preprocess([image], {**metadata, "resize_size": size}))


def _scores(logits: torch.Tensor, metadata: dict[str, Any]) -> np.ndarray:
    if metadata.get("task") == "multi-label":
        return torch.sigmoid(logits).detach().numpy()  # type: ignore[no-any-return]
    return torch.softmax(logits, dim=0).detach().numpy()  # type: ignore[no-any-return]


class _TopOfMean:
    """pytorch-grad-cam target: the logit, in each image, of the class whose logit is the
    highest on average over the batch (the flip-TTA prediction), read from the forward pass
    the CAM has just made (`cam.outputs`), so no second pass is needed to know it."""

    def __init__(self, cam: Any):
        self.cam = cam

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[..., int(self.cam.outputs.detach().float().mean(0).argmax())]


def _cams(
    model: nn.Module, x: torch.Tensor, index: int | None, top_of_mean: bool = False
) -> tuple[np.ndarray, torch.Tensor]:
    """(NxHxW heatmaps, each in [0, 1], of class `index`; Nxclasses logits) for an Nx3xHxW
    batch, in one forward and one backward pass. `index` None: each image's highest logit,
    or with `top_of_mean` the class highest on average over the batch."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layers, reshape = target_layers(model)
    cam = GradCAM(model=model, target_layers=layers, reshape_transform=reshape)
    try:
        targets: list[Any] | None = None
        if index is not None:
            targets = [ClassifierOutputTarget(index)] * len(x)
        elif top_of_mean:
            targets = [_TopOfMean(cam)] * len(x)
        # requires_grad on the input: gradients for the activations, none for the weights.
        heatmaps = cam(input_tensor=x.detach().requires_grad_(True), targets=targets)
        return heatmaps, cam.outputs.detach()
    finally:
        cam.activations_and_grads.release()  # not `with`: its __exit__ swallows IndexError


def grad_cam(
    model: nn.Module, x: torch.Tensor, index: int | None
) -> tuple[np.ndarray, torch.Tensor]:
    """(the HxW heatmap in [0, 1] of class `index`, the logits) for a 1x3xHxW input;
    `index` None explains the highest logit (the top class)."""
    heatmaps, logits = _cams(model, x, index)
    return heatmaps[0], logits[0]


def flip_tta_grad_cam(
    model: nn.Module, x: torch.Tensor, index: int | None
) -> tuple[np.ndarray, torch.Tensor]:
    """As `grad_cam` for a model served with flip TTA (`"tta": "hflip"`, `core.inference`):
    the logits are the mean of the image's and its mirror's, `index` None is the top class
    of that mean, and the heatmap is the mean of the image's map and the mirror's map
    flipped back onto the image, rescaled so that its peak is 1 (as a single map's is)."""
    both = torch.cat([x, x.flip(-1)]).detach()
    heatmaps, logits = _cams(model, both, index, top_of_mean=True)
    heatmap = (heatmaps[0] + heatmaps[1][:, ::-1]) / 2
    peak = float(heatmap.max())
    return (heatmap / peak if peak > 0 else heatmap), logits.mean(0)


def explain_image(
    model: nn.Module, metadata: dict[str, Any], crop: np.ndarray, target: str | None
) -> tuple[bytes, dict[str, Any]]:
    """(the overlay as PNG, the prediction) for one crop. `target` is a class name; None
    explains the top class (single-label: the prediction; multi-label: the most probable)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    started = time.perf_counter()
    classes: list[str] = list(metadata["class_names"])
    if target is not None and target not in classes:
        raise ValueError(f"target {target!r} is not one of the model's classes")
    wanted = None if target is None else classes.index(target)
    tta = metadata.get("tta") == "hflip"  # predictions average the image and its mirror
    explain = flip_tta_grad_cam if tta else grad_cam
    heatmap, logits = explain(model, model_input(crop, metadata), wanted)
    index = int(logits.argmax()) if wanted is None else wanted
    scores = _scores(logits, metadata)
    overlay = show_cam_on_image(crop.astype(np.float32) / 255.0, heatmap, use_rgb=True)
    png = io.BytesIO()
    Image.fromarray(overlay).save(png, format="PNG")
    order = np.argsort(-scores)
    multi = metadata.get("task") == "multi-label"
    if multi:
        thresholds = metadata["thresholds"]
        predicted = [classes[i] for i in order if scores[i] >= thresholds[i]]
    else:
        predicted = [classes[int(order[0])]]
    prediction = {
        "task": "multi-label" if multi else "single-label",
        "explained": {"label": classes[index], "probability": float(scores[index])},
        "top_k": [{"label": classes[i], "probability": float(scores[i])} for i in order[:TOP_K]],
        "predicted": predicted,
        "backbone": metadata["backbone"],
        "input_size": int(metadata["input_size"][1]),
        "tta": "hflip" if tta else None,
        "seconds": round(time.perf_counter() - started, 4),
    }
    return png.getvalue(), prediction


def prepare(model: nn.Module) -> nn.Module:
    """Eval mode, and no gradients kept for the weights: Grad-CAM needs them only for the
    activations, which the input's requires_grad gives at a fraction of the cost."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def cached_model(store: ObjectStore, result: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The job's model, loaded once per process (the MODELS_KEPT most recently used)."""
    key = result["safetensors_key"]
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
    with tempfile.TemporaryDirectory(prefix="explain-") as tmp:
        folder = Path(tmp)
        store.get_file(result["metadata_key"], folder / "metadata.json")
        store.get_file(key, folder / "model.safetensors")
        model, metadata = load_model(folder)
    loaded = (prepare(model), metadata)
    with _models_lock:
        _models[key] = loaded
        while len(_models) > MODELS_KEPT:
            _models.popitem(last=False)
    return loaded


def _job_result(settings: Settings, job_id: str) -> dict[str, Any] | None:
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        if job is None or not job.result or "safetensors_key" not in job.result:
            return None
        return dict(job.result)


def explain_to_store(job_id: str, explanation: str, settings: Settings | None = None) -> str:
    """Explain and store the outcome (or why it failed). Returns what happened."""
    settings = settings or get_settings()
    store = get_store(settings)
    key = explanation_key(job_id, explanation)
    if store.exists(f"{key}.json"):  # a re-sent task for an explanation already done
        store.delete_prefix(f"{key}.pending")
        return "cached"
    try:
        request = json.loads(store.get_bytes(f"{key}.request.json"))
        result = _job_result(settings, job_id)
        if result is None:
            raise ValueError(f"job {job_id} has no model any more")
        model, metadata = cached_model(store, result)
        with Image.open(io.BytesIO(store.get_bytes(f"{key}.input.png")), formats=["PNG"]) as im:
            crop = np.asarray(im.convert("RGB"))
        png, prediction = explain_image(model, metadata, crop, request.get("target"))
    except StorageNotFound as exc:
        if not store.exists(f"{key}.request.json"):
            # Evicted since it was asked for: nothing to write, nobody to tell.
            store.delete_prefix(f"{key}.pending")
            log.info("explanation %s skipped: it is gone (%s)", key, exc)
            return "gone"
        return _failed(store, key, exc)
    except Exception as exc:
        if is_transient(exc):
            # The pending marker stays: the API sends the task again once it is stale.
            log.warning("explanation %s: transient failure (%s); left to a later request", key, exc)
            return "retry"
        return _failed(store, key, exc)
    store.put_bytes(f"{key}.png", png)
    store.put_bytes(f"{key}.json", json.dumps(prediction).encode())
    store.delete_prefix(f"{key}.pending")
    log.info("explanation %s done in %.2fs", key, prediction["seconds"])
    return "done"


def _failed(store: ObjectStore, key: str, exc: BaseException) -> str:
    log.exception("explanation %s failed", key)
    error = {"message": f"{type(exc).__name__}: {exc}", "at": time.time()}
    store.put_bytes(f"{key}.error.json", json.dumps(error).encode())
    store.delete_prefix(f"{key}.pending")
    return "failed"

"""Hosted predictions: a job's verified `model.onnx`, run by onnxruntime (never torch).

The API loads a model once into a bounded LRU of onnxruntime sessions (`Predictors`), keyed
by the model file's store key (a job's model never changes once written). Only files a job's
own `result` names are ever loaded, after the caller's ownership check: a request cannot
choose a path, and ONNX is protobuf (no pickle is ever read).

Preprocessing is `core.imaging.preprocess`, the code training's evaluation is checked against,
so a prediction here equals the one the model gave in the job's report for the same image.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from core import imaging
from core.storage import ObjectStore


@dataclass
class Predictor:
    """One loaded model: its onnxruntime session and its metadata.json."""

    key: str
    session: Any
    metadata: dict[str, Any]
    input_name: str
    output_name: str

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.metadata["class_names"]]

    @property
    def multilabel(self) -> bool:
        return self.metadata.get("task") == "multi-label"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The model's logits; with `"tta": "hflip"` in its metadata (set by a job whose
        validation scored better that way), the mean of the image's and its mirror's."""
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        if self.metadata.get("tta") == "hflip":
            mirrored = np.ascontiguousarray(batch[..., ::-1])
            out = (out + self.session.run([self.output_name], {self.input_name: mirrored})[0]) / 2
        return out

    def predict(self, images: list[Image.Image], top_k: int) -> list[dict[str, Any]]:
        """Per image: `top` (label, probability) best first; multi-label models also give
        every class's `scores`, the `thresholds` and the `labels` at or over them."""
        crops = [imaging.crop_for_model(img, self.metadata) for img in images]
        return self.predict_crops(crops, top_k)

    def predict_crops(self, crops: list[np.ndarray], top_k: int) -> list[dict[str, Any]]:
        """As `predict`, from `imaging.crop_for_model`'s uint8 crops."""
        logits = self.logits(imaging.normalize(crops, self.metadata)).astype(np.float64)
        classes = self.classes
        k = max(1, min(top_k, len(classes)))
        out = []
        if self.multilabel:
            probs = 1.0 / (1.0 + np.exp(-logits))
            thresholds = [float(t) for t in self.metadata["thresholds"]]
        else:
            shifted = np.exp(logits - logits.max(1, keepdims=True))
            probs = shifted / shifted.sum(1, keepdims=True)
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            item: dict[str, Any] = {
                "top": [{"label": classes[i], "probability": float(row[i])} for i in order]
            }
            if self.multilabel:
                item["scores"] = {c: float(p) for c, p in zip(classes, row, strict=True)}
                item["thresholds"] = dict(zip(classes, thresholds, strict=True))
                item["labels"] = [
                    c for c, p, t in zip(classes, row, thresholds, strict=True) if p >= t
                ]
            out.append(item)
        return out


def _session(model: bytes, threads: int, spin: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # No spinning: onnxruntime's pool threads otherwise busy-wait after each run for the
    # next one, on the cores the event loop, the decoding threads and every other process
    # of the host need (2 cores, measured: a spinning API slowed a bare `session.run` in
    # another process from 11.9 to 22.6 ms; under load a single prediction's p50 was 88 ms
    # spinning, 70 ms not). Waking the threads costs a run about 1.5 ms (BENCHMARKS.md);
    # PREDICT_SPIN buys it back where cores are spare.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class Predictors:
    """A bounded, thread-safe LRU of loaded models (`size` sessions at most). Loading happens
    outside the lock, so one slow load never blocks predictions on models already loaded;
    two requests that load the same model at once keep the first."""

    def __init__(self, size: int, threads: int = 0, spin: bool = False):
        self.size = size
        self.threads = threads
        self.spin = spin
        self._items: OrderedDict[str, Predictor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, store: ObjectStore, onnx_key: str, metadata_key: str) -> Predictor:
        with self._lock:
            hit = self._items.get(onnx_key)
            if hit is not None:
                self._items.move_to_end(onnx_key)
                return hit
        metadata = json.loads(store.get_bytes(metadata_key))
        session = _session(store.get_bytes(onnx_key), self.threads, self.spin)
        onnx = metadata.get("onnx") or {}
        loaded = Predictor(
            onnx_key,
            session,
            metadata,
            onnx.get("input") or session.get_inputs()[0].name,
            onnx.get("output") or session.get_outputs()[0].name,
        )
        with self._lock:
            kept = self._items.setdefault(onnx_key, loaded)
            self._items.move_to_end(onnx_key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return kept

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

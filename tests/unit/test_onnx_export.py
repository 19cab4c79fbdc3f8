"""The ONNX export's check (worker/training/onnx_export.py) on small models: which exporter
ships, which images PyTorch checks, and a file that computes something else never ships."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from worker.training import onnx_export
from worker.training.onnx_export import (
    MAX_LOGIT_DIFF,
    OnnxMismatch,
    export_and_check,
    export_onnx,
)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


class BranchOnInput(nn.Module):
    """Data-dependent control flow: a trace records the branch its example takes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y if x.mean() > 0 else -y


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32) + 0.5


def test_the_fast_exporter_ships_a_verified_file_with_a_dynamic_batch(tmp_path):
    model, batch = small_net(), images(100)
    info, logits = export_and_check(model, 16, tmp_path / "m.onnx", batch, verify=20)
    assert info["exporter"] == "torchscript" and "failed_exporters" not in info
    assert info["onnx_images"] == 100 and info["checked_images"] >= 20
    assert info["top1_agreement"] == 1.0 and info["max_abs_logit_diff"] <= MAX_LOGIT_DIFF
    with torch.no_grad():
        ref = model(torch.from_numpy(batch)).numpy()
    assert logits.shape == (100, 5) and np.abs(logits - ref).max() <= MAX_LOGIT_DIFF
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        (out,) = session.run(None, {"input": batch[:n]})
        assert np.abs(out - ref[:n]).max() <= MAX_LOGIT_DIFF


def test_pytorch_checks_the_least_certain_images():
    logits = np.zeros((6, 3), np.float32)
    logits[:, 0] = [5.0, 0.5, 3.0, 0.0005, 4.0, 0.2]  # top-1 margins over class 1 (zero)
    picked, left = onnx_export._least_certain(logits, 2)
    # The two smallest margins (rows 3 and 5), and every row under 2 * MAX_LOGIT_DIFF.
    assert picked.tolist() == [3, 5] and left == pytest.approx(0.5)
    logits[[1, 5], 0] = [0.001, 0.0015]  # three near-ties the allowed difference could flip
    picked, left = onnx_export._least_certain(logits, 2)
    assert picked.tolist() == [1, 3, 5] and left == pytest.approx(3.0)
    assert onnx_export._least_certain(logits, 6)[0].tolist() == list(range(6))


def test_a_traced_file_that_computes_something_else_never_ships(tmp_path):
    """The trace bakes in the branch of its all-zero example; the check runs real images,
    sees the other branch's logits, and the file is not shipped."""
    path = tmp_path / "m.onnx"
    with pytest.raises(OnnxMismatch, match="torchscript exporter: OnnxMismatch") as caught:
        export_onnx(BranchOnInput().eval(), 16, path, images(40), exporters=("torchscript",))
    assert "onnxruntime disagrees with PyTorch" in str(caught.value)
    assert not path.exists()


def test_the_maintained_exporter_takes_over_when_the_first_is_gone(tmp_path, monkeypatch):
    def gone(*args, **kwargs):
        raise RuntimeError("the TorchScript-based exporter was removed")

    monkeypatch.setitem(onnx_export._EXPORTERS, "torchscript", gone)
    info = export_onnx(small_net(), 16, tmp_path / "m.onnx", images(10))
    assert info["exporter"] == "dynamo" and info["top1_agreement"] == 1.0
    assert "was removed" in info["failed_exporters"][0]

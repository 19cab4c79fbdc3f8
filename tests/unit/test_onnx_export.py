"""The ONNX export's check (worker/training/onnx_export.py) on small models: which exporter
ships, which images PyTorch checks, and a file that computes something else never ships."""

from __future__ import annotations

import re

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
    """Data-dependent control flow: a trace records the branch its example takes (the
    logits times `scale`; 1.05 keeps the top-1)."""

    def __init__(self, scale: float = -1.0) -> None:
        super().__init__()
        self.net = small_net()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y if x.mean() > 0 else y * self.scale


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


def test_pytorch_checks_the_least_certain_images_and_a_random_few():
    n = 60
    logits = np.zeros((n, 3), np.float32)
    logits[:, 0] = np.linspace(1.0, 5.0, n)  # top-1 margins over class 1 (zero)
    logits[[7, 40], 0] = [0.0005, 0.2]
    picked, left = onnx_export._least_certain(logits, 2)
    # The two smallest margins, every row under 2 * MAX_LOGIT_DIFF, and RANDOM_CHECKED more.
    assert {7, 40} <= set(picked.tolist())
    assert len(picked) == 2 + onnx_export.RANDOM_CHECKED == len(set(picked.tolist()))
    unchecked = sorted(set(range(n)) - set(picked.tolist()))
    assert left == pytest.approx(float(logits[unchecked, 0].min()))
    again, _ = onnx_export._least_certain(logits, 2)
    assert again.tolist() == picked.tolist()  # a fixed seed: the same check every time
    logits[[1, 5], 0] = [0.001, 0.0015]  # near-ties the allowed difference could flip
    picked, _ = onnx_export._least_certain(logits, 2)
    assert {1, 5, 7} <= set(picked.tolist()) and len(picked) == 3 + onnx_export.RANDOM_CHECKED
    assert onnx_export._least_certain(logits, n)[0].tolist() == list(range(n))


class NanOnSome(nn.Module):
    """Finite logits for most images, NaN for the brightest: a margin never picks NaN rows."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        bright = (x.mean(dim=(1, 2, 3)) > 0.6).unsqueeze(1).expand_as(y)
        return torch.where(bright, torch.log(torch.zeros_like(y) - 1.0), y)  # log(-1): NaN


def test_a_file_that_returns_nan_for_some_images_never_ships(tmp_path):
    batch = images(80)
    batch[:5] += 1.0  # five bright images
    path = tmp_path / "m.onnx"
    with pytest.raises(OnnxMismatch, match="NaN or infinite logits for 5 of 80"):
        export_onnx(NanOnSome().eval(), 16, path, batch, verify=8)
    assert not path.exists()


def test_a_traced_file_that_computes_something_else_never_ships(tmp_path):
    """The trace bakes in the branch of its all-zero example; the check runs real images,
    sees the other branch's logits, and the file is not shipped."""
    path = tmp_path / "m.onnx"
    with pytest.raises(OnnxMismatch, match="torchscript exporter: OnnxMismatch") as caught:
        export_onnx(BranchOnInput().eval(), 16, path, images(40), exporters=("torchscript",))
    assert "onnxruntime disagrees with PyTorch" in str(caught.value)
    assert not path.exists()


def test_a_file_with_the_same_top1_but_other_logits_fails_the_float64_check_too(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(OnnxMismatch, match="top-1 agreement 1.0000") as caught:
        export_onnx(BranchOnInput(1.05).eval(), 16, path, images(40), exporters=("torchscript",))
    # The float64 run agrees with PyTorch's float32, not with the file.
    found = re.search(r"onnxruntime is (\S+) away, PyTorch's float32 (\S+)", str(caught.value))
    assert found, str(caught.value)
    assert float(found[1]) > 1e-3 > 100 * float(found[2])
    assert not path.exists()


def least_squares_vit(images: np.ndarray) -> nn.Module:
    """A 1-block ViT with benchmarks/onnx_export.py's head: least squares on its own pooled
    features, as many images as feature dimensions. The fit cancels large terms (weights in
    the thousands for logits of 10), so each float32 result rounds about 1e-2 from exact."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=128, depth=1, num_heads=2, num_classes=10
    ).eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(torch.from_numpy(images)), True)
        target = nn.functional.one_hot(torch.arange(len(images)) % 10, 10).float()
        model.head.weight.copy_(torch.linalg.lstsq(feats, target).solution.T * 10)
        model.head.bias.zero_()
    return model


def test_a_vit_whose_float32_results_both_round_far_from_exact_ships(tmp_path):
    """onnxruntime and PyTorch differ by more than MAX_LOGIT_DIFF, with the same top-1; in
    float64 onnxruntime is about as close as PyTorch's float32 (the ViT-B case)."""
    batch = np.random.default_rng(0).standard_normal((128, 3, 32, 32)).astype(np.float32)
    model = least_squares_vit(batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info, logits = export_and_check(model, 32, tmp_path / "m.onnx", batch, verify=32)
    assert info["exporter"] == "torchscript" and "failed_exporters" not in info
    assert info["top1_agreement"] == 1.0 and info["max_abs_logit_diff"] > MAX_LOGIT_DIFF
    fp64 = info["fp64_check"]
    assert fp64["images"] == onnx_export.FP64_IMAGES
    assert fp64["onnxruntime_error"] <= fp64["allowed"] < info["max_abs_logit_diff"] * 10
    assert info["graph_optimization"] == "ORT_ENABLE_ALL"
    assert (tmp_path / "m.onnx").exists() and logits.shape == (128, 10)
    # The float64 run gave the model back as it was: float32, the same weights.
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_the_maintained_exporter_takes_over_when_the_first_is_gone(tmp_path, monkeypatch):
    def gone(*args, **kwargs):
        raise RuntimeError("the TorchScript-based exporter was removed")

    monkeypatch.setitem(onnx_export._EXPORTERS, "torchscript", gone)
    info = export_onnx(small_net(), 16, tmp_path / "m.onnx", images(10))
    assert info["exporter"] == "dynamo" and info["top1_agreement"] == 1.0
    assert "was removed" in info["failed_exporters"][0]


def test_hosted_predictions_run_the_file_as_the_check_verified_it(tmp_path):
    from core import inference

    path = tmp_path / "m.onnx"
    info = export_onnx(small_net(), 16, path, images(10))
    served = inference._session(path.read_bytes(), 1).get_session_options()
    checked = onnx_export._session(path).get_session_options()
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert served.graph_optimization_level == checked.graph_optimization_level == level
    assert info["graph_optimization"] == level.name


def test_a_file_wrong_only_at_batch_size_one_never_ships(tmp_path, monkeypatch):
    """The single-image answer (how predictions run it) counts in every test, the float64
    second opinion included: off by 5% at batch 1 only, the top-1 kept, it is refused."""
    real = onnx_export.run_onnx

    def off_at_one(session, batch, chunk=64):
        out = real(session, batch, chunk)
        return out * 1.05 if len(batch) == 1 else out

    monkeypatch.setattr(onnx_export, "run_onnx", off_at_one)
    path = tmp_path / "m.onnx"
    with pytest.raises(OnnxMismatch, match="in float64"):
        export_onnx(small_net(), 16, path, images(40), exporters=("torchscript",))
    assert not path.exists()

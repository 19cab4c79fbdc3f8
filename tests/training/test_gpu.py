"""The GPU path, on a real CUDA device (skipped without one): fine-tuning with channels-last
inputs and weights at the backbone's precision (bf16 autocast, or fp32 for the depthwise
nets), fp16 with a GradScaler, the final report and
the probe's features computed on the GPU, evaluation on the GPU agreeing with the CPU, the
auto recipe measuring the GPU, and one job in an NCCL process group (DDP).

CI has no GPU: these run where one is lent (`benchmarks/gpu_path.py` beside them; figures in
BENCHMARKS.md). Two NCCL ranks need two devices: `test_distributed.py`'s last test."""

from __future__ import annotations

import pytest
import torch

from core.jobspec import Augmentation, JobSpec
from worker.training import fit as fit_module
from worker.training import probe as probe_module
from worker.training import recipe
from worker.training import runtime as runtime_module
from worker.training.callbacks import Callbacks
from worker.training.data import prepare
from worker.training.distributed import fit_distributed
from worker.training.fit import fit
from worker.training.loop import predict
from worker.training.runtime import Runtime, amp_dtype_for

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(150),
]

# `digits` (500 digits, ingested): tests/training/conftest.py


def spec(**overrides) -> JobSpec:
    params = dict(
        recipe="manual",
        strategy="full",
        image_size=64,
        batch_size=64,
        epochs=12,  # the CPU, same spec: 0.93 validation accuracy (4 epochs: 0.43)
        learning_rate=1e-3,
        augmentation=Augmentation(hflip=False),
        device="gpu",
        refit=False,
    )
    return JobSpec(**{**params, **overrides})


@pytest.fixture(scope="module")
def data(digits):
    archive, index, cache = digits
    config = spec()
    return prepare(archive, index, config, cache)


class Seen:
    """What the model saw in its forward passes: (training?, autocast dtype or None,
    channels-last input?, weight dtype, device)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, torch.dtype | None, bool, torch.dtype, str]] = []

    def hook(self, module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        cl = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
        weight = next(module.parameters())
        self.calls.append((module.training, amp, cl, weight.dtype, x.device.type))


@pytest.mark.parametrize(
    "backbone, pretrained",
    [
        ("efficientnet_lite0", True),  # fp32: slower under autocast (core.backbones)
        ("resnet18", False),  # bf16 (fp16 without it); no ImageNet weights offline
    ],
)
def test_fine_tuning_runs_channels_last_at_the_backbones_precision_on_the_gpu(
    data, monkeypatch, backbone, pretrained
):
    amp = amp_dtype_for(torch.device("cuda"), backbone)
    assert (amp is None) == (backbone == "efficientnet_lite0"), amp
    seen = Seen()
    created = fit_module.create_model

    def spied(*args, **kwargs):
        model = created(*args, **kwargs)
        model.register_forward_pre_hook(seen.hook)
        return model

    monkeypatch.setattr(fit_module, "create_model", spied)
    reported = []
    final_predict = fit_module.predict

    def spy(model, loader, device, amp_dtype=None, **kw):
        reported.append((device.type, amp_dtype, next(model.parameters()).device.type))
        return final_predict(model, loader, device, amp_dtype, **kw)

    monkeypatch.setattr(fit_module, "predict", spy)
    result = fit(spec(backbone=backbone), data, num_workers=2, pretrained=pretrained)

    assert result.device.startswith("cuda")
    training = [c for c in seen.calls if c[0]]
    assert training, seen.calls
    assert all(c[1] == amp and c[2] and c[4] == "cuda" for c in training), training
    assert all(c[3] == torch.float32 for c in training)  # fp32 master weights under autocast
    # The final report: on the GPU, in full precision (it describes the delivered model).
    assert reported and all(r == ("cuda", None, "cuda") for r in reported), reported
    if pretrained:
        assert result.best["val_accuracy"] > 0.8, result.history
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    assert losses[-1] < losses[0], losses
    # Handed back on the CPU, in the ordinary memory format (export and delivery read it).
    p = next(result.model.parameters())
    assert p.device.type == "cpu" and p.dtype == torch.float32
    conv = next(m for m in result.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


def test_fp16_with_a_grad_scaler_learns_where_bf16_is_missing(data, monkeypatch):
    """An older GPU (V100, T4) has no bf16: an autocast backbone trains in float16 with a
    GradScaler. resnet18 from scratch (no ImageNet weights offline): the loss must fall."""
    monkeypatch.setattr(
        runtime_module, "amp_dtype_for", lambda device, backbone=None: torch.float16
    )
    scalers = []
    real = torch.amp.GradScaler

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scalers.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", Counting)
    result = fit(spec(backbone="resnet18"), data, num_workers=2, pretrained=False)
    assert scalers, "float16 training must scale its loss"
    assert all(s.get_scale() > 0 for s in scalers)
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    assert all(loss == loss and loss < 1e4 for loss in losses), losses  # no NaN, no blow-up
    assert losses[-1] < 0.8 * losses[0], losses


def test_evaluation_on_the_gpu_agrees_with_the_cpu(data):
    """The report's pass (fp32 on the GPU) gives the CPU's answers; bf16 autocast (how an
    autocast backbone's epochs are validated; lite0 is fp32 throughout) may flip a few
    near-ties but must score about the same."""
    config = spec(epochs=8)
    result = fit(config, data, num_workers=0)
    loader = Runtime.on(torch.device("cuda"), 0).loader(data.val_set(config), 128)
    model = result.model
    cpu_logits, targets = predict(model, loader, torch.device("cpu"), None)
    gpu_model = model.to("cuda").to(memory_format=torch.channels_last)
    fp32_logits, fp32_targets = predict(gpu_model, loader, torch.device("cuda"), None)
    bf16_logits, _ = predict(gpu_model, loader, torch.device("cuda"), torch.bfloat16)
    assert torch.equal(targets, fp32_targets)
    assert fp32_logits.dtype == torch.float32 and fp32_logits.device.type == "cpu"

    def agree(logits: torch.Tensor) -> float:
        return (cpu_logits.argmax(1) == logits.argmax(1)).float().mean().item()

    def accuracy(logits: torch.Tensor) -> float:
        return (logits.argmax(1) == targets).float().mean().item()

    figures = {
        "fp32 agreement": agree(fp32_logits),
        "bf16 agreement": agree(bf16_logits),
        "cpu accuracy": accuracy(cpu_logits),
        "fp32 accuracy": accuracy(fp32_logits),
        "bf16 accuracy": accuracy(bf16_logits),
        "fp32 max logit diff": (fp32_logits - cpu_logits).abs().max().item(),
    }
    print("evaluation on the GPU:", figures)
    assert figures["fp32 agreement"] >= 0.99, figures
    assert abs(figures["bf16 accuracy"] - figures["cpu accuracy"]) <= 0.05, figures


def test_the_probe_extracts_its_features_on_the_gpu(data, monkeypatch):
    calls = []
    real = probe_module.predict

    def spy(model, loader, device, amp_dtype=None, features=False, **kw):
        calls.append((device.type, features))
        return real(model, loader, device, amp_dtype, features, **kw)

    monkeypatch.setattr(probe_module, "predict", spy)
    result = fit(
        spec(strategy="lp_ft", epochs=1, probe_epochs=10, learning_rate=1e-4), data, num_workers=0
    )
    assert ("cuda", True) in calls, calls
    assert result.best["val_accuracy"] > 0.8, result.history


def test_the_auto_recipe_measures_the_gpu_and_plans_for_it(digits):
    archive, index, _ = digits
    config = JobSpec(recipe="auto", device="gpu")
    planned = recipe.plan(config, [], archive, index, device=torch.device("cuda"))
    record, speed = planned.record, planned.record["speed"]
    assert record["device"] == "cuda" and record["candidates"], record
    # Measured as training runs: an H200 ran lite0 at thousands of images/s once its
    # kernels were ready; planning measured 63 when bf16 prepared them inside the timing.
    assert all(c["images_per_second"] > 1000 for c in record["candidates"]), record
    assert speed["train_images_per_second"] > 500, speed
    assert speed["planning_seconds"] < 20, speed["planning_steps"]
    # 500 images: room for many fine-tuning epochs in the default budget (60 s on a GPU).
    assert planned.spec.strategy == "lp_ft" and planned.spec.epochs >= 5, record


class Steps(Callbacks):
    def __init__(self) -> None:
        self.steps = 0
        self.phases: list[str] = []

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.steps += 1

    def on_phase(self, phase: str) -> None:
        self.phases.append(phase)


def test_one_job_trains_in_an_nccl_process_group(data):
    """One rank on cuda:0 (NCCL refuses two ranks on one device): the launcher, the NCCL
    process group, DDP, the all-reduced stop flags and rank 0's broadcasts all run."""
    calls = Steps()
    result = fit_distributed(
        spec(strategy="lp_ft", epochs=2, probe_epochs=10, learning_rate=1e-4, gpus=1),
        data,
        calls,
        num_workers=0,
    )
    assert result.extra["distributed"] == {"processes": 1, "backend": "nccl"}
    assert result.device.startswith("cuda")
    assert calls.steps > 0 and "extracting features" in calls.phases
    assert result.best["val_accuracy"] > 0.8, result.history


def test_a_job_that_asks_for_any_device_takes_the_gpu(data):
    result = fit(spec(epochs=1, device="auto"), data, num_workers=0)
    assert result.device.startswith("cuda")

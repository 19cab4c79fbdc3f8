"""Where a job trains and is scored: the final report runs on the training device (a GPU
worker's report used to run on its CPU) in full precision (it describes the delivered fp32
model), and the spec's `device` holds. The GPU's own checks: `test_gpu.py`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.jobspec import Augmentation, JobSpec
from worker.training import fit as fit_module
from worker.training.data import prepare
from worker.training.fit import fit
from worker.training.runtime import Runtime, amp_dtype_for

# `few_digits` (100 digits, ingested): tests/training/conftest.py


def spec(**overrides) -> JobSpec:
    params = dict(
        recipe="manual",
        strategy="linear_probe",
        image_size=32,
        batch_size=32,
        probe_epochs=15,
        augmentation=Augmentation(hflip=False),
        refit=False,
    )
    return JobSpec(**{**params, **overrides})


def test_the_final_report_is_scored_where_the_model_trained_in_full_precision(
    few_digits, monkeypatch
):
    """bfloat16 autocast on the CPU stands in for a GPU's mixed precision: the epochs are
    scored with it, the report on the run's device in fp32, before the model moves to the
    CPU."""
    archive, index, cache = few_digits
    on = Runtime.on
    monkeypatch.setattr(
        Runtime,
        "on",
        classmethod(
            lambda cls, d, n, b=None: dataclasses.replace(on(d, n, b), amp_dtype=torch.bfloat16)
        ),
    )
    seen = []
    predict = fit_module.predict

    def spy(model, loader, device, amp_dtype=None, **kw):
        seen.append((device, amp_dtype))
        return predict(model, loader, device, amp_dtype, **kw)

    monkeypatch.setattr(fit_module, "predict", spy)
    config = spec(device="cpu")
    result = fit(config, prepare(archive, index, config, cache), num_workers=0)
    assert seen and all(s == (torch.device("cpu"), None) for s in seen), seen
    # The same 20 images, bf16 against fp32: at most two differ (seen: 0.70 and 0.75).
    diff = result.report["validation"]["top1_accuracy"] - result.best["val_accuracy"]
    assert round(abs(diff) * 20) <= 2, diff
    assert next(result.model.parameters()).device.type == "cpu"  # handed back on the CPU


def test_device_cpu_holds(few_digits):
    archive, index, cache = few_digits
    config = spec(device="cpu")
    assert fit(config, prepare(archive, index, config, cache), num_workers=0).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_device_gpu_without_cuda_fails_saying_so(few_digits):
    archive, index, cache = few_digits
    config = spec(device="gpu")
    with pytest.raises(RuntimeError, match="asked for device 'gpu' and this worker has no CUDA"):
        fit(config, prepare(archive, index, config, cache), num_workers=0)


def test_autocast_on_a_gpu_follows_the_backbone(monkeypatch):
    """bf16 (fp16 without it) on a GPU, except for the depthwise nets that ran slower under
    it (`core.backbones`: gpu_autocast); never on the CPU. No GPU needed: nothing runs."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert amp_dtype_for(cuda, "resnet50") == torch.bfloat16
    assert amp_dtype_for(cuda) == torch.bfloat16  # a model the recipe does not name
    assert amp_dtype_for(cuda, "efficientnet_lite0") is None
    assert amp_dtype_for(torch.device("cpu"), "resnet50") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert amp_dtype_for(cuda, "resnet18") == torch.float16
    assert Runtime.on(torch.device("cpu"), 0, "resnet50").amp_dtype is None


def test_training_runs_channels_last_on_the_cpu_and_hands_back_a_contiguous_model(
    few_digits, monkeypatch
):
    """Channels-last is 1.4-1.7x faster for lite0 on a 2-core CPU (BENCHMARKS.md): every
    batch the model sees in training and evaluation is channels-last, as are its
    convolutions' weights, and the model comes back in the default layout (safetensors,
    ONNX)."""
    archive, index, cache = few_digits
    create = fit_module.create_model
    seen: list[tuple[bool, bool]] = []

    def spy(*args, **kwargs):
        model = create(*args, **kwargs)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))

        def hook(_module, inputs):
            cl = torch.channels_last
            seen.append(
                (
                    inputs[0].is_contiguous(memory_format=cl),
                    conv.weight.is_contiguous(memory_format=cl),
                )
            )

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(fit_module, "create_model", spy)
    config = spec(device="cpu", strategy="lp_ft", epochs=1, probe_epochs=5)
    result = fit(config, prepare(archive, index, config, cache), num_workers=0)
    assert len(seen) > 3 and all(a and w for a, w in seen), seen
    conv = next(m for m in result.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()
    assert all(p.is_contiguous() for p in result.model.state_dict().values())

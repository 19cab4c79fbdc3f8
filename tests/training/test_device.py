"""Where a job trains and is scored: the final report runs on the training device at the
training precision (a GPU worker's report used to run on its CPU), and the spec's `device`
holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.jobspec import Augmentation, JobSpec
from worker.training import fit as fit_module
from worker.training.data import prepare
from worker.training.fit import fit
from worker.training.runtime import Runtime

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


def test_the_final_report_is_scored_where_and_as_the_model_trained(few_digits, monkeypatch):
    """bfloat16 autocast on the CPU stands in for a GPU's mixed precision: the report must
    be computed with the run's device and dtype, on the model before it moves to the CPU."""
    archive, index, cache = few_digits
    on = Runtime.on
    monkeypatch.setattr(
        Runtime,
        "on",
        classmethod(lambda cls, d, n: dataclasses.replace(on(d, n), amp_dtype=torch.bfloat16)),
    )
    seen = []
    predict = fit_module.predict

    def spy(model, loader, device, amp_dtype=None, **kw):
        seen.append((device, amp_dtype))
        return predict(model, loader, device, amp_dtype, **kw)

    monkeypatch.setattr(fit_module, "predict", spy)
    config = spec()
    result = fit(config, prepare(archive, index, config, cache), num_workers=0)
    assert seen and all(s == (torch.device("cpu"), torch.bfloat16) for s in seen), seen
    assert result.report["validation"]["top1_accuracy"] == pytest.approx(
        result.best["val_accuracy"], abs=1e-6
    )
    assert next(result.model.parameters()).device.type == "cpu"  # handed back on the CPU


def test_device_cpu_holds_and_gpu_without_cuda_fails_saying_so(few_digits):
    archive, index, cache = few_digits
    config = spec(device="cpu")
    assert fit(config, prepare(archive, index, config, cache), num_workers=0).device == "cpu"
    config = spec(device="gpu")
    with pytest.raises(RuntimeError, match="asked for device 'gpu' and this worker has no CUDA"):
        fit(config, prepare(archive, index, config, cache), num_workers=0)

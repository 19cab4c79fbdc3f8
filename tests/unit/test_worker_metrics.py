"""A worker's epoch metrics: what reaches Prometheus from one epoch's numbers. The GPU is
the edge this machine lacks, so CUDA's three answers are stood in for; the rest is real."""

from __future__ import annotations

import torch
from prometheus_client import REGISTRY

from worker import metrics


def value(name: str, labels: dict[str, str] | None = None) -> float | None:
    return REGISTRY.get_sample_value(name, labels or {})


def test_an_epoch_feeds_the_duration_histogram_and_the_throughput_gauge(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = value("finetune_worker_epoch_duration_seconds_count") or 0.0
    metrics.epoch_ended({"epoch": 1, "epoch_seconds": 3.5, "images_per_second": 812.0})
    assert value("finetune_worker_epoch_duration_seconds_count") == before + 1
    assert value("finetune_worker_images_per_second") == 812.0
    if metrics._gpu_max_memory is None:  # no CUDA so far in this process: no GPU series
        assert value("finetune_worker_gpu_max_memory_bytes") is None


def test_a_cuda_epoch_reports_the_peak_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *_: 3 * 1024**3)
    metrics.epoch_ended({"epoch": 2, "epoch_seconds": 1.0, "images_per_second": 1.0})
    assert value("finetune_worker_gpu_max_memory_bytes") == 3 * 1024**3


def test_an_epoch_without_timings_records_nothing_rather_than_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = value("finetune_worker_epoch_duration_seconds_count") or 0.0
    metrics.epoch_ended({"epoch": 1, "phase": "probe"})
    assert value("finetune_worker_epoch_duration_seconds_count") == before


def test_a_finished_attempt_is_counted_by_status_and_timed():
    before = value("finetune_worker_jobs_finished_total", {"status": "failed"}) or 0.0
    metrics.job_finished("failed", 12.0)
    assert value("finetune_worker_jobs_finished_total", {"status": "failed"}) == before + 1
    assert (value("finetune_worker_job_duration_seconds_count", {"status": "failed"}) or 0) >= 1

"""The Celery settings long training jobs rely on, read from the app the workers run."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import worker.tasks  # the task module: imports torch, must not touch CUDA
from worker.celery_app import app
from core.settings import get_settings
import torch
s = get_settings()
conf = app.conf
json.dump({
    "acks_late": conf.task_acks_late,
    "reject_on_worker_lost": conf.task_reject_on_worker_lost,
    "prefetch": conf.worker_prefetch_multiplier,
    "ignore_result": conf.task_ignore_result,
    "visibility": conf.broker_transport_options.get("visibility_timeout"),
    "hard_limit": s.job_hard_limit_seconds,
    "celery_time_limit": conf.task_time_limit,
    "celery_soft_time_limit": conf.task_soft_time_limit,
    "cuda_initialized": torch.cuda.is_initialized(),
    "warnings": s.warnings(),
    "tasks": sorted(t for t in app.tasks if t.startswith("finetune.")),
    "preview_queue": app.amqp.router.route({}, "finetune.render_preview")["queue"].name,
    "explain_queue": app.amqp.router.route({}, "finetune.explain")["queue"].name,
    "webhook_queue": app.amqp.router.route({}, "finetune.deliver_webhook")["queue"].name,
    "train_queue": app.amqp.router.route({}, "finetune.train_job")["queue"].name,
}, sys.stdout)
"""


def probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, "BROKER_URL": "redis://127.0.0.1:6379/0", **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_worker_runs_with_late_acks_prefetch_one_and_a_long_visibility_timeout():
    conf = probe()
    assert conf["acks_late"] and conf["reject_on_worker_lost"] and conf["ignore_result"]
    assert conf["prefetch"] == 1
    # Redis must not redeliver a job that may still legitimately be running.
    assert conf["visibility"] > conf["hard_limit"]
    assert conf["warnings"] == []
    # Per-job limits replace Celery's (which the solo pool cannot enforce).
    assert conf["celery_time_limit"] is None and conf["celery_soft_time_limit"] is None
    # Importing the worker (and torch) touches no CUDA: nothing to break in a forked child.
    assert conf["cuda_initialized"] is False


def test_previews_are_routed_to_the_light_queue_and_training_to_the_task_queue():
    conf = probe(TASK_QUEUE="heavy-q", LIGHT_QUEUE="light-q")
    assert conf["tasks"] == [
        "finetune.deliver_webhook",
        "finetune.explain",
        "finetune.render_preview",
        "finetune.train_job",
    ]
    assert conf["preview_queue"] == "light-q" and conf["train_queue"] == "heavy-q"
    assert conf["explain_queue"] == "light-q" and conf["webhook_queue"] == "light-q"


def test_a_visibility_timeout_shorter_than_the_hard_limit_is_warned_about():
    conf = probe(BROKER_VISIBILITY_TIMEOUT_SECONDS="60", JOB_MAX_DURATION_SECONDS="3600")
    assert conf["visibility"] == 60
    assert any("BROKER_VISIBILITY_TIMEOUT_SECONDS (60)" in w for w in conf["warnings"])


def test_the_gpu_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/gpu_path.py is what a session with a GPU runs first: keep it working
    (here on the CPU, tiny)."""
    out = tmp_path / "gpu.json"
    subprocess.run(
        [sys.executable, "benchmarks/gpu_path.py", "--device", "cpu", "--backbone", "resnet18"]
        + ["--image-size", "32", "--batch-size", "4", "--steps", "1", "--warmup", "1"]
        + ["--json", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    figures = json.loads(out.read_text())
    assert set(figures["variants"]) >= {"fp32", "fp32 + channels_last"}
    assert all(v["images_per_second"] > 0 for v in figures["variants"].values())
    assert figures["worker_path"]["amp_dtype"] == "fp32"  # no autocast on the CPU

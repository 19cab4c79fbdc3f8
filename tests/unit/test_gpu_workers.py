"""`finetune worker --gpus` (cli/gpus.py) and what a worker publishes about itself
(worker/capabilities.py). No GPU here: the device count is the edge that is faked."""

from __future__ import annotations

import os
import sys
import time

import pytest

from cli import gpus
from cli.main import main
from cli.supervisor import WorkerSupervisor
from core.db import migrate, session_scope
from core.models import Worker
from core.settings import Settings
from worker.capabilities import Publisher, worker_identity


@pytest.mark.parametrize(
    "spec, count, expected",
    [("all", 2, [0, 1]), ("0,1", 4, [0, 1]), (" 3 ", 4, [3]), ("2,0", 3, [2, 0])],
)
def test_gpus_name_all_or_indices_on_this_host(spec, count, expected):
    assert gpus.parse_gpus(spec, count) == expected


@pytest.mark.parametrize(
    "spec, count, message",
    [
        ("all", 0, "this host has no CUDA GPU"),
        ("0", 0, "without --gpus for a CPU worker"),
        ("2", 2, "this host has 2 GPU(s), no 2; valid: all, or indices 0..1"),
        ("0,x", 2, "'x' is not a GPU index"),
        ("1,1", 2, "GPU 1 is named twice"),
        ("-1", 2, "'-1' is not a GPU index"),
    ],
)
def test_gpus_that_are_not_here_are_refused_naming_what_is(spec, count, message):
    with pytest.raises(gpus.GpuSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gpus.parse_gpus(spec, count)


def test_worker_gpus_on_a_host_without_cuda_exits_with_a_clear_error(capsys):
    assert gpus.cuda_device_count() == 0  # this host; the premise
    assert main(["worker", "--gpus", "all"]) == 2
    assert "this host has no CUDA GPU" in capsys.readouterr().err


def test_worker_gpus_starts_one_child_per_named_gpu(monkeypatch):
    started = {}
    monkeypatch.setattr(gpus, "cuda_device_count", lambda: 4)
    monkeypatch.setattr(
        gpus,
        "run_gpu_workers",
        lambda s, ids, pool, per_job=False: started.update(ids=ids, pool=pool) or 0,
    )
    assert main(["worker", "--gpus", "0,2", "--pool", "threads"]) == 0
    assert started == {"ids": [0, 2], "pool": "threads"}


def test_each_gpu_child_sees_its_gpu_only_and_consumes_the_gpu_queue():
    settings = Settings()
    children = gpus.gpu_supervisors(settings, [0, 3], "solo")
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in children] == ["0", "3"]
    for child in children:
        q = child.command[child.command.index("-Q") + 1]
        assert q == settings.gpu_queue
    names = [c.command[c.command.index("--hostname") + 1] for c in children]
    assert names[0].startswith("finetune-gpu0-") and names[1].startswith("finetune-gpu3-")
    assert children[0].env["PATH"] == os.environ["PATH"]  # the rest is inherited


def test_a_per_job_worker_sees_all_its_gpus_and_takes_only_multi_gpu_jobs(capsys, monkeypatch):
    settings = Settings()
    (child,) = gpus.gpu_supervisors(settings, [1, 2, 3], "solo", per_job=True)
    assert child.env["CUDA_VISIBLE_DEVICES"] == "1,2,3"
    q = child.command[child.command.index("-Q") + 1]
    assert q == "finetune-gpu-x2,finetune-gpu-x3"  # jobs of 2 or 3 GPUs, not GPU_QUEUE's
    monkeypatch.setattr(gpus, "cuda_device_count", lambda: 4)
    assert main(["worker", "--gpus", "2", "--per-job"]) == 2
    assert "name two GPUs or more" in capsys.readouterr().err


def test_the_supervised_child_really_gets_its_environment(tmp_path):
    out = tmp_path / "env.txt"
    code = f"import os; open({str(out)!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    child = WorkerSupervisor(
        [sys.executable, "-c", code + "; import time; time.sleep(60)"],
        env=gpus.gpu_worker_env(dict(os.environ), 1),
        stop_grace_seconds=2,
    )
    child.start()
    try:
        deadline = time.monotonic() + 20
        while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert out.read_text() == "1"
    finally:
        child.stop()


def test_a_worker_publishes_its_device_queues_and_backbones(tmp_path):
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/w.db")
    migrate(settings)

    class Consumer:  # what Celery's worker_ready hands over
        hostname = "finetune-1@host-a"

        class app:  # noqa: N801
            class amqp:  # noqa: N801
                class queues:  # noqa: N801
                    consume_from = {settings.task_queue: None, settings.light_queue: None}

    worker_id, queues = worker_identity(Consumer())
    assert worker_id == "finetune-1@host-a"
    publisher = Publisher(settings, worker_id, queues)
    publisher(settings)  # before the probe has answered: nothing claimed yet
    with session_scope(settings) as session:
        assert session.get(Worker, worker_id) is None
    publisher.first()
    with session_scope(settings) as session:
        row = session.get(Worker, worker_id)
        assert row.device_kind == "cpu" and row.memory_bytes > 2**20
        assert row.queues == sorted([settings.task_queue, settings.light_queue])
        assert "efficientnet_lite0" in row.backbones and "convnext_tiny" not in row.backbones
    publisher.withdraw()
    with session_scope(settings) as session:
        assert session.get(Worker, worker_id) is None

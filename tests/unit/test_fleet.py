"""The workers' published capabilities (core/fleet.py, on the embedded SQLite database):
the submit check and the training queue ask the live workers, and fall back to the API's
host only when no worker is on record."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from core import fleet
from core.db import migrate, session_scope, utcnow
from core.errors import ServiceError
from core.jobspec import JobCreate
from core.models import Worker
from core.settings import Settings

LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/fleet.db")
    migrate(s)
    return s


def caps(settings: Settings, kind: str = "cpu", queues=None, backbones=None) -> fleet.Capabilities:
    return fleet.Capabilities(
        hostname="host-a",
        queues=queues or [settings.task_queue, settings.light_queue],
        device_kind=kind,
        device_name="NVIDIA H100" if kind == "cuda" else "cpu",
        memory_bytes=80 * 2**30,
        backbones=backbones if backbones is not None else LITE,
    )


def refusal(settings: Settings, backbone: str, device: str = "auto") -> ServiceError:
    with session_scope(settings) as session, pytest.raises(ServiceError) as caught:
        fleet.check_submit(session, settings, backbone, device)
    return caught.value


def accepts(settings: Settings, backbone: str, device: str = "auto") -> None:
    with session_scope(settings) as session:
        fleet.check_submit(session, settings, backbone, device)


def queue(settings: Settings, device: str) -> str:
    with session_scope(settings) as session:
        return fleet.train_queue(session, settings, device)


def test_without_workers_on_record_the_api_host_answers_as_before(settings):
    accepts(settings, "efficientnet_lite0")  # packaged weights
    exc = refusal(settings, "convnext_tiny")
    assert exc.code.value == "WEIGHTS_UNAVAILABLE"
    assert ", ".join(LITE) in exc.detail and "finetune weights pull convnext_tiny" in exc.detail
    assert queue(settings, "auto") == settings.task_queue  # routing as it always was


def test_a_live_worker_with_weights_makes_a_backbone_usable_the_api_host_lacks(settings):
    fleet.publish(settings, "w1@host-a", caps(settings, backbones=[*LITE, "resnet18"]))
    accepts(settings, "resnet18")
    exc = refusal(settings, "convnext_tiny")
    assert exc.code.value == "WEIGHTS_UNAVAILABLE" and "no live worker has them" in exc.detail
    assert f"{', '.join(LITE)}, resnet18" in exc.detail


def test_a_backbone_only_the_api_host_has_is_refused_once_workers_publish(settings, tmp_path):
    (tmp_path / "resnet18.safetensors").write_bytes(b"placeholder: availability is by file")
    api = settings.model_copy(update={"weights_dir": tmp_path})
    accepts(api, "resnet18")  # nobody on record yet: the host's file counts
    fleet.publish(settings, "w1@host-a", caps(settings))
    exc = refusal(api, "resnet18")
    assert f"usable now: {', '.join(LITE)}. Run" in exc.detail


def test_device_gpu_needs_a_live_gpu_worker(settings):
    exc = refusal(settings, "efficientnet_lite0", "gpu")
    assert exc.code.value == "VALIDATION_ERROR" and "no live worker has a GPU" in exc.detail
    assert "live training workers: none" in exc.detail
    fleet.publish(settings, "w1@host-a", caps(settings))
    exc = refusal(settings, "efficientnet_lite0", "gpu")
    assert "w1@host-a (cpu)" in exc.detail and "--gpus" in exc.detail
    fleet.publish(
        settings,
        "gpu0@host-b",
        caps(settings, "cuda", [settings.gpu_queue], backbones=["efficientnet_lite0"]),
    )
    accepts(settings, "efficientnet_lite0", "gpu")
    # A GPU job's backbone must be loadable on a GPU worker, not just anywhere.
    assert "no live GPU worker has them" in refusal(settings, "efficientnet_lite1", "gpu").detail
    accepts(settings, "efficientnet_lite1", "auto")


def test_auto_routes_to_the_gpu_queue_only_while_a_worker_consumes_it(settings):
    fleet.publish(settings, "w1@host-a", caps(settings))
    assert queue(settings, "auto") == settings.task_queue
    assert queue(settings, "gpu") == settings.gpu_queue  # waits there for a GPU worker
    fleet.publish(settings, "gpu0@host-b", caps(settings, "cuda", [settings.gpu_queue]))
    assert queue(settings, "auto") == settings.gpu_queue
    assert queue(settings, "gpu") == settings.gpu_queue
    assert queue(settings, "cpu") == settings.task_queue


def test_device_cpu_needs_a_live_worker_on_the_task_queue_once_workers_publish(settings):
    accepts(settings, "efficientnet_lite0", "cpu")  # nobody on record: as before
    fleet.publish(settings, "gpu0@host-b", caps(settings, "cuda", [settings.gpu_queue]))
    exc = refusal(settings, "efficientnet_lite0", "cpu")
    assert (
        exc.code.value == "VALIDATION_ERROR" and "no live worker consumes TASK_QUEUE" in exc.detail
    )
    fleet.publish(settings, "w1@host-a", caps(settings, backbones=["efficientnet_lite0"]))
    accepts(settings, "efficientnet_lite0", "cpu")
    assert "no live CPU worker has them" in refusal(settings, "efficientnet_lite1", "cpu").detail


def test_a_plain_worker_on_a_gpu_host_takes_auto_jobs_not_gpu_ones(settings):
    """`device: gpu` means a worker started with --gpus: a plain worker shares TASK_QUEUE with
    CPU workers, which would take the job and fail it."""
    fleet.publish(settings, "w1@gpu-host", caps(settings, "cuda"))
    assert "w1@gpu-host (cuda)" in refusal(settings, "efficientnet_lite0", "gpu").detail
    accepts(settings, "efficientnet_lite0", "auto")
    assert queue(settings, "auto") == settings.task_queue


def test_a_silent_worker_goes_stale_then_is_forgotten_and_a_clean_stop_withdraws(settings):
    fleet.publish(settings, "gpu0@host-b", caps(settings, "cuda", [settings.gpu_queue]))
    fleet.publish(settings, "w1@host-a", caps(settings))
    stale = utcnow() - timedelta(seconds=settings.stale_after_seconds + 1)
    with session_scope(settings) as session:
        session.get(Worker, "gpu0@host-b").heartbeat_at = stale
    assert queue(settings, "auto") == settings.task_queue  # a dead GPU worker takes nothing
    assert "no live worker has a GPU" in refusal(settings, "efficientnet_lite0", "gpu").detail
    with session_scope(settings) as session:
        assert session.get(Worker, "gpu0@host-b") is not None  # stale, not yet forgotten
        forgotten = utcnow() - timedelta(seconds=settings.stale_after_seconds * 11)
        session.get(Worker, "gpu0@host-b").heartbeat_at = forgotten
    fleet.publish(settings, "w1@host-a", caps(settings))  # any beat forgets it
    fleet.withdraw(settings, "w1@host-a")
    with session_scope(settings) as session:
        assert session.query(Worker).count() == 0


def test_a_beat_refreshes_the_row_and_keeps_its_start(settings):
    fleet.publish(settings, "w1@host-a", caps(settings))
    with session_scope(settings) as session:
        first = session.get(Worker, "w1@host-a")
        started, beat = first.started_at, first.heartbeat_at
    fleet.publish(settings, "w1@host-a", caps(settings, backbones=[*LITE, "resnet50"]))
    with session_scope(settings) as session:
        row = session.get(Worker, "w1@host-a")
        assert row.started_at == started and row.heartbeat_at >= beat
        assert "resnet50" in row.backbones and row.memory_bytes == 80 * 2**30


def test_queue_for_a_missing_job_is_the_task_queue(settings):
    assert fleet.queue_for_job(settings, "job_missing") == settings.task_queue


def test_the_job_device_is_auto_by_default_and_checked():
    assert JobCreate(dataset_id="ds_1").device == "auto"
    assert JobCreate(dataset_id="ds_1", device="gpu").device == "gpu"
    with pytest.raises(ValidationError, match="'auto', 'cpu' or 'gpu'"):
        JobCreate(dataset_id="ds_1", device="tpu")


def test_gpu_queue_must_be_a_queue_of_its_own():
    with pytest.raises(ValidationError, match="GPU_QUEUE"):
        Settings(task_queue="training", gpu_queue="training")


def test_a_multi_gpu_job_needs_a_live_worker_that_sees_that_many_gpus(settings):
    def check(gpus: int, device: str = "auto") -> None:
        with session_scope(settings) as session:
            fleet.check_submit(session, settings, "efficientnet_lite0", device, gpus)

    def route(gpus: int, device: str = "auto") -> str:
        with session_scope(settings) as session:
            return fleet.train_queue(session, settings, device, gpus)

    # Per-GPU workers (one device each) and a CPU worker cannot take a 2-GPU job.
    fleet.publish(settings, "w1@host-a", caps(settings))
    fleet.publish(settings, "gpu0@host-b", caps(settings, "cuda", [settings.gpu_queue]))
    with pytest.raises(ServiceError, match="no live worker sees 2 GPUs") as caught:
        check(2)
    assert "finetune-gpu-x2" in caught.value.detail and "--per-job" in caught.value.detail
    assert "gpu0@host-b (cuda)" in caught.value.detail
    with pytest.raises(ServiceError, match="device 'cpu'.*ALLOW_CPU_DISTRIBUTED"):
        check(2, "cpu")
    check(1)  # one GPU: as before

    # A worker that sees four GPUs (`--gpus 0,1,2,3 --per-job`) takes 2, 3 and 4; not 5.
    four = fleet.multi_gpu_queues(settings, 4)
    assert four == ["finetune-gpu-x2", "finetune-gpu-x3", "finetune-gpu-x4"]
    fleet.publish(settings, "gpus0-3@host-c", caps(settings, "cuda", four))
    for n in (2, 3, 4):
        check(n)
        check(n, "gpu")
        assert route(n) == route(n, "gpu") == f"finetune-gpu-x{n}"
    with pytest.raises(ServiceError, match="no live worker sees 5 GPUs"):
        check(5)
    assert route(1) == settings.gpu_queue  # single-GPU jobs still go to the per-GPU workers


def test_gloo_ranks_on_cpu_workers_only_where_the_operator_allows_them(tmp_path):
    s = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path}/fleet.db",
        allow_cpu_distributed=True,
    )
    migrate(s)
    fleet.publish(s, "w1@host-a", caps(s))
    with session_scope(s) as session:
        fleet.check_submit(session, s, "efficientnet_lite0", "cpu", 2)
        fleet.check_submit(session, s, "efficientnet_lite0", "auto", 2)
        assert fleet.train_queue(session, s, "cpu", 2) == s.task_queue
        assert fleet.train_queue(session, s, "auto", 2) == s.task_queue
        # `gpu` still means GPUs: it waits for a worker that sees two.
        assert fleet.train_queue(session, s, "gpu", 2) == "finetune-gpu-x2"
        with pytest.raises(ServiceError, match="no live worker sees 2 GPUs"):
            fleet.check_submit(session, s, "efficientnet_lite0", "gpu", 2)


def test_the_job_gpus_field_is_1_by_default_and_bounded():
    assert JobCreate(dataset_id="ds_1").gpus == 1
    assert JobCreate(dataset_id="ds_1", gpus=8).gpus == 8
    for bad, message in ((0, "greater than or equal to 1"), (9, "less than or equal to 8")):
        with pytest.raises(ValidationError, match=message) as caught:
            JobCreate(dataset_id="ds_1", gpus=bad)
        assert caught.value.errors()[0]["loc"] == ("gpus",)
    with pytest.raises(ValidationError, match="gpus 2 with `search`.*set gpus to 1"):
        JobCreate(dataset_id="ds_1", gpus=2, search={"trials": 2, "budget_seconds": 60})

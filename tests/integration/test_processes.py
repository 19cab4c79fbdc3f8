"""The CLI's processes, for real: `finetune serve`, `worker` and `demo` stop with every process
they started (DataLoader workers included) on SIGTERM and SIGINT; the embedded workers come
back when they die now and then and are given up on when they crash-loop; and forwarded
headers are believed only from the proxies FORWARDED_ALLOW_IPS names.

Everything runs on the embedded default (SQLite, kombu over SQLite, local objects) under a
temporary DATA_DIR. The process trees are read from /proc, before the signal."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.supervisor import WorkerSupervisor
from tests.conftest import REPO, free_port, wait_for
from tests.helpers import digits_samples, digits_zip, imagefolder_zip

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc"),
]

SERVER_VARS = (
    "DATABASE_URL",
    "BROKER_URL",
    "STORAGE_BACKEND",
    "STORAGE_DIR",
    "S3_ENDPOINT_URL",
    "TASK_QUEUE",
    "LIGHT_QUEUE",
    "FORWARDED_ALLOW_IPS",
)
# serve: uvicorn's shutdown, then its workers' warm shutdown; generous for a busy 2-core host.
STOP_BOUND = 90.0

Proc = tuple[int, str]  # (pid, start time): a pid alone may be reused while we look


# --- /proc ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            parents[int(entry.name)] = int(fields[1])
    return parents


def generations(root: int) -> list[set[int]]:
    """[{root}, its children, their children, ...]"""
    parents = _parents()
    levels = [{root}]
    while below := {pid for pid, parent in parents.items() if parent in levels[-1]}:
        levels.append(below)
    return levels


def tree(root: int) -> set[Proc]:
    """`root` and all its descendants, as (pid, start time)."""
    pids = set().union(*generations(root))
    return {(pid, fields[19]) for pid in pids if (fields := _stat(pid))}


def depth(root: int) -> int:
    """How many generations below `root` the tree goes."""
    return len(generations(root)) - 1


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def alive(procs: set[Proc]) -> set[Proc]:
    """Those still running: same pid and start time, and not a zombie."""
    return {
        (pid, start)
        for pid, start in procs
        if (fields := _stat(pid)) and fields[19] == start and fields[0] != "Z"
    }


def assert_all_gone(procs: set[Proc], proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STOP_BOUND
    while alive(procs) and time.monotonic() < deadline:
        proc.poll()  # reap our own child, or it stays a zombie
        time.sleep(0.2)
    left = alive(procs)
    commands = {pid: cmdline(pid)[:120] for pid, _ in left}
    assert not left, f"still running after {STOP_BOUND}s: {commands}\n{log.read_text()[-3000:]}"


# --- starting things --------------------------------------------------------------------


def embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVER_VARS}
    env.update(
        DATA_DIR=str(tmp_path / "var"),
        AUTH_ENABLED="false",
        PYTHONUNBUFFERED="1",
        # Two DataLoader worker processes per training job: grandchildren of `serve`.
        DATALOADER_WORKERS="2",
        PROGRESS_INTERVAL_SECONDS="0.3",
        STOP_GRACE_SECONDS="20",
    )
    env.update(extra)
    return env


class Started:
    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", *args],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.everything: set[Proc] = set()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        assert self.proc.poll() is None, self.text()[-3000:]
        return True

    def signal_tree(self, signum: int) -> None:
        """Note every process in the tree, then signal the top one."""
        self.everything = tree(self.proc.pid)
        self.proc.send_signal(signum)

    def cleanup(self) -> None:
        """Whatever a failed test left: the tree as it is now, plus what it noted."""
        left = alive(self.everything | tree(self.proc.pid))
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture()
def start(tmp_path: Path) -> Iterator:
    started: list[Started] = []

    def run(*args: str, env: dict[str, str] | None = None) -> Started:
        log = tmp_path / f"{args[0]}-{len(started)}.log"
        s = Started(list(args), env or embedded_env(tmp_path), log)
        started.append(s)
        return s

    yield run
    for s in started:
        s.cleanup()


def serve(start, *args: str, env: dict[str, str] | None = None) -> tuple[Started, str]:
    port = free_port()
    s = start("serve", "--port", str(port), *args, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        s.running()
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 120, "API ready")
    return s, url


def workers_ready(s: Started, count: int) -> None:
    wait_for(lambda: s.running() and s.text().count(" ready.") >= count, 120, "workers ready")


def running_job(url: str) -> str:
    """Submit a long job and return once it trains (its DataLoader workers exist)."""
    train, _ = digits_samples(limit=300)
    ds = httpx.post(
        f"{url}/v1/datasets",
        files={"file": ("d.zip", digits_zip(train), "application/zip")},
        timeout=120,
    )
    assert ds.status_code == 201, ds.text
    body = {
        "dataset_id": ds.json()["id"],
        "epochs": 200,
        "image_size": 32,
        "augmentation": {"hflip": False},
    }
    job = httpx.post(f"{url}/v1/jobs", json=body, timeout=30)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    wait_for(
        lambda: httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["progress"]["step"] > 0,
        300,
        "the job trains",
    )
    return job_id


# --- stopping -------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_its_api_and_both_workers_on_a_signal(start, signum):
    s, _ = serve(start)
    workers_ready(s, 2)
    s.signal_tree(signum)
    assert len(s.everything) >= 3, s.everything  # serve and its two worker children
    assert_all_gone(s.everything, s.proc, s.log)
    assert s.proc.wait() == 128 + signum
    assert "Traceback" not in s.text()


def test_serve_stopped_mid_job_leaves_no_dataloader_worker_behind(start):
    s, url = serve(start)
    workers_ready(s, 2)
    job_id = running_job(url)
    wait_for(lambda: depth(s.proc.pid) >= 2, 60, "DataLoader workers (grandchildren)")
    s.signal_tree(signal.SIGTERM)
    assert_all_gone(s.everything, s.proc, s.log)
    assert f"job {job_id}" in s.text() and "handed back on shutdown" in s.text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_worker_stopped_mid_job_leaves_nothing_behind(start, tmp_path, signum):
    _, url = serve(start, "--no-worker")
    worker = start("worker", "--queues", "training")
    workers_ready(worker, 1)
    running_job(url)
    wait_for(lambda: depth(worker.proc.pid) >= 1, 60, "DataLoader workers (children)")
    worker.signal_tree(signum)
    assert len(worker.everything) >= 3, worker.everything
    assert_all_gone(worker.everything, worker.proc, worker.log)


def test_the_demo_stops_the_service_and_its_workers_on_sigterm(start, tmp_path):
    demo = start("demo", "--port", str(free_port()), "--epochs", "50")
    wait_for(lambda: demo.running() and "submitted job" in demo.text(), 300, "demo job")
    # The demo, the service, its two workers (and, once it trains, DataLoader workers).
    wait_for(lambda: len(tree(demo.proc.pid)) >= 4, 60, "the service's workers")
    demo.signal_tree(signal.SIGTERM)
    assert_all_gone(demo.everything, demo.proc, demo.log)
    assert demo.proc.wait() == 128 + signal.SIGTERM


def child_pid(supervisor: WorkerSupervisor) -> int:
    return supervisor.proc.pid if supervisor.proc else 0


# A worker stand-in that ignores SIGTERM and starts a grandchild that ignores it too.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); time.sleep(600)",
]


def test_a_worker_that_does_not_stop_is_killed_with_everything_it_started():
    sup = WorkerSupervisor(STUBBORN, stop_grace_seconds=1.0)
    sup.start()
    try:
        pid = wait_for(lambda: child_pid(sup), 10, "a worker child")
        wait_for(lambda: depth(pid) >= 1, 30, "its own child")
        everything = tree(pid)
        started = time.monotonic()
        sup.stop()
        assert time.monotonic() - started < 10
        wait_for(lambda: not alive(everything), 5, "the whole group gone")
    finally:
        sup.kill()


def test_what_a_dead_worker_leaves_behind_is_killed_before_it_is_restarted():
    sup = WorkerSupervisor(STUBBORN, max_backoff_seconds=0.2, stop_grace_seconds=1.0)
    sup.start()
    try:
        pid = wait_for(lambda: child_pid(sup), 10, "a worker child")
        wait_for(lambda: depth(pid) >= 1, 30, "its own child")
        everything = tree(pid)
        os.kill(pid, signal.SIGKILL)  # its child is orphaned, and would run on
        wait_for(lambda: not alive(everything), 5, "the orphan gone")
        wait_for(lambda: child_pid(sup) not in (0, pid), 10, "a restarted worker")
    finally:
        sup.stop()


# --- restarting -------------------------------------------------------------------------


def test_a_worker_that_dies_now_and_then_is_always_restarted():
    """Deaths further apart than the window never add up: five of them, with two allowed."""
    sup = WorkerSupervisor(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        max_restarts=2,
        window_seconds=1.5,
        max_backoff_seconds=0.2,
    )
    sup.start()
    try:
        for _ in range(5):
            pid = wait_for(lambda: child_pid(sup), 10, "a worker child")
            time.sleep(1.6)  # it runs longer than the window: its earlier deaths expire
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda old=pid: child_pid(sup) not in (0, old), 10, "a restarted worker")
        assert not sup.gave_up.is_set() and sup.is_alive()
    finally:
        sup.stop()
    assert sup.proc is not None and sup.proc.returncode is not None


def test_a_crash_loop_is_given_up_on_with_a_log_line_that_says_so(caplog):
    sup = WorkerSupervisor(
        [sys.executable, "-c", "import sys; sys.exit(3)"],
        max_restarts=3,
        window_seconds=60,
        max_backoff_seconds=0.2,
    )
    with caplog.at_level(logging.INFO, logger="finetune"):
        sup.start()
        assert sup.gave_up.wait(30)
        sup.join(5)
    assert not sup.is_alive()
    starts = [r for r in caplog.records if "worker child process started" in r.message]
    assert len(starts) == 4  # the first start and three restarts
    (last,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "died 4 times within 60s (last exit code 3)" in last.message
    assert "crash loop" in last.message and "WORKER_MAX_RESTARTS" in last.message


def test_serve_restarts_a_killed_worker_and_gives_up_on_a_crash_loop(start, tmp_path):
    env = embedded_env(tmp_path, WORKER_MAX_RESTARTS="1", WORKER_RESTART_WINDOW_SECONDS="3")
    s, _ = serve(start, env=env)
    workers_ready(s, 2)

    def training_worker() -> int:
        for pid, _ in tree(s.proc.pid):
            if b"-Q\x00finetune\x00" in cmdline(pid):
                return pid
        return 0

    # Spread out: each death is more than the window after the one before; it comes back.
    for n in range(3):
        pid = wait_for(training_worker, 60, "the training worker")
        time.sleep(3.5)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda old=pid: training_worker() not in (0, old), 60, "the worker restarted")
        wait_for(lambda n=n: s.text().count(" ready.") >= 3 + n, 120, "the restart ready")
    # A crash loop: killed whenever it is back, until the supervisor gives up on it.
    deadline = time.monotonic() + 60
    while "crash loop" not in s.text():
        assert time.monotonic() < deadline, s.text()[-3000:]
        if pid := training_worker():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    time.sleep(3)
    assert training_worker() == 0  # given up on: not started again
    assert s.running()  # the API and the light worker go on
    s.signal_tree(signal.SIGTERM)
    assert_all_gone(s.everything, s.proc, s.log)


# --- forwarded headers ------------------------------------------------------------------


def _audited_client(url: str) -> str | None:
    upload = httpx.post(
        f"{url}/v1/datasets",
        files={"file": ("d.zip", imagefolder_zip({"a": 2, "b": 2}), "application/zip")},
        headers={"X-Forwarded-For": "6.6.6.6"},
        timeout=60,
    )
    assert upload.status_code == 201, upload.text
    events = httpx.get(f"{url}/v1/admin/audit", params={"limit": 100}, timeout=10).json()["data"]
    (event,) = [e for e in events if e["object_id"] == upload.json()["id"]]
    return event["client"]


def test_x_forwarded_for_from_loopback_is_not_believed_by_default(start):
    _, url = serve(start, "--no-worker")
    assert _audited_client(url) == "127.0.0.1"


def test_x_forwarded_for_is_believed_from_a_declared_proxy(start, tmp_path):
    env = embedded_env(tmp_path, FORWARDED_ALLOW_IPS="127.0.0.1")
    _, url = serve(start, "--no-worker", env=env)
    assert _audited_client(url) == "6.6.6.6"

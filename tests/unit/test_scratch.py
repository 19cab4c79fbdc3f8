"""Scratch folders of killed workers are swept; those of live workers and this process stay
(worker/training/scratch.py), with real processes killed by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from worker.training import scratch

MAKER = """
import sys, time
from worker.training import scratch
path = scratch.make(sys.argv[2], root=sys.argv[1])
(path / "checkpoint.pt").write_bytes(b"x" * 1000)
print(path, flush=True)
time.sleep(600)
"""


def start_maker(root: Path, label: str) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", MAKER, str(root), label],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_makers_folder_is_swept_and_a_live_ones_is_not(tmp_path):
    dead, dead_dir = start_maker(tmp_path, "job_dead")
    alive, alive_dir = start_maker(tmp_path, "job_alive")
    try:
        mine = scratch.make("job_mine", root=str(tmp_path))
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert (dead_dir / "checkpoint.pt").exists()  # SIGKILL removed nothing
        removed = scratch.sweep(str(tmp_path))
        assert removed == [dead_dir] and not dead_dir.exists()
        assert (alive_dir / "checkpoint.pt").exists() and mine.exists()
        alive.terminate()
        alive.wait()
        assert scratch.sweep(str(tmp_path)) == [alive_dir]
        scratch.release(mine)
        assert not mine.exists()
    finally:
        for proc in (dead, alive):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_folder_without_its_lock_file_is_left_while_young(tmp_path):
    young = tmp_path / f"{scratch.PREFIX}job-abc"
    young.mkdir()  # as between mkdtemp and the flock
    assert scratch.sweep(str(tmp_path)) == []
    old = time.time() - scratch.UNLOCKED_GRACE_SECONDS - 5
    os.utime(young, (old, old))
    assert scratch.sweep(str(tmp_path)) == [young]
    other = tmp_path / "someone-elses"
    other.mkdir()
    assert scratch.sweep(str(tmp_path)) == [] and other.exists()

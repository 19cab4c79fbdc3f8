"""The README's first command, run the way a user runs it: no servers, SQLite under
DATA_DIR, a local object store, kombu over SQLite, and a worker child process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.e2e

SERVER_VARS = ("DATABASE_URL", "BROKER_URL", "STORAGE_BACKEND", "S3_ENDPOINT_URL", "TASK_QUEUE")


def test_demo_trains_downloads_and_reports_held_out_accuracy(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in SERVER_VARS}
    env["DATA_DIR"] = str(tmp_path / "var")
    env["PYTHONUNBUFFERED"] = "1"
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--exit", "--port", str(port)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    match = re.search(
        r"DEMO_RESULT job=(\S+) wall_seconds=([\d.]+) held_out_accuracy=([\d.]+)", out
    )
    assert match, out[-4000:]
    assert float(match.group(3)) > 0.85  # digits at 64 px, 3 epochs; chance is 0.1

    var = tmp_path / "var"
    # Everything lives under DATA_DIR: SQLite DB, broker, objects, the downloaded model.
    assert (var / "finetune.db").is_file() and (var / "broker.db").is_file()
    assert list((var / "objects" / "datasets").glob("ds_*/images.zip"))
    assert (var / "objects" / "jobs" / match.group(1) / "model" / "model.safetensors").is_file()
    assert (var / "demo" / "model" / "model.torchscript.pt").is_file()
    assert "%" in out and "step" in out  # the progress bar was drawn
    # The service was stopped: nothing still listens on the port.
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0

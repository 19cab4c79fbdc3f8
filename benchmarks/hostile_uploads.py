"""Hostile uploads against a running API: does one archive stall or bloat the process?

Starts the API with uvicorn in a child process (embedded SQLite and local objects under a
temporary DATA_DIR, AUTH_ENABLED=false), then uploads the worst archive of each kind from
`tests/hostile.py` while another thread polls /healthz every 50 ms. Prints, per archive, the
status code, the error code, the slowest /healthz answer during the upload and the API's
peak RSS growth over its RSS before the upload (the kernel's high-water mark, reset before
each upload). Targets: RSS growth under 200 MB, /healthz under 100 ms.

    .venv/bin/python benchmarks/hostile_uploads.py [--smoke]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import hostile  # noqa: E402

MiB = 1024 * 1024
RSS_TARGET_MB = 200
HEALTHZ_TARGET_MS = 100


def archives(smoke: bool) -> list[tuple[str, str, Callable[[], bytes]]]:
    """(label, upload file name, builder): full size as found by the review, or small."""
    zeros = 64 * MiB if smoke else 1024 * MiB
    long_name = 16 * MiB if smoke else 300 * MiB
    rows = 240_000 if smoke else 2_400_000
    good = hostile.good_members(3) + hostile.TAR_END
    return [
        ("good tar.gz (baseline)", "good.tar.gz", lambda: hostile.compress(good, "gz")),
        ("pax header, 60,000 digits", "pax.tar.gz", lambda: hostile.pax_digits(60_000)),
        (
            f"GNU long name {long_name // MiB} MB, bz2",
            "long.tar.bz2",
            lambda: hostile.gnu_long_name(long_name, real=True, how="bz2"),
        ),
        (
            f"GNU long name {long_name // MiB} MB, gz",
            "long.tar.gz",
            lambda: hostile.gnu_long_name(long_name, real=True, how="gz"),
        ),
        (
            f"skipped notes.txt, {zeros // MiB} MiB zeros, bz2",
            "notes.tar.bz2",
            lambda: hostile.skipped_zeros(zeros, how="bz2"),
        ),
        (
            f"skipped notes.txt, {zeros // MiB} MiB zeros, gz",
            "notes.tar.gz",
            lambda: hostile.skipped_zeros(zeros, how="gz"),
        ),
        (f"manifest bomb, {rows:,} rows", "manifest.zip", lambda: hostile.manifest_bomb(rows)),
        ("tar name not UTF-8", "latin1.tar", hostile.non_utf8_tar),
        ("zip name flagged UTF-8, not", "latin1.zip", hostile.non_utf8_zip),
        ("symlink then file, same name", "link.tar", hostile.link_then_file),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Poller(threading.Thread):
    """GET /healthz every 50 ms; the slowest answer since the last reset."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=base, timeout=30)
        self.worst = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            start = time.perf_counter()
            self.client.get("/healthz").raise_for_status()
            self.worst = max(self.worst, time.perf_counter() - start)
            self.stopped.wait(0.05)


def start_api(tmp: str, port: int) -> subprocess.Popen[bytes]:
    # The embedded defaults: SQLite, the kombu-over-SQLite broker and local objects in `tmp`.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "BROKER_", "S3_"))}
    env.update(AUTH_ENABLED="false", DATA_DIR=tmp)
    env.pop("STORAGE_DIR", None)
    subprocess.run(
        [sys.executable, "-m", "cli", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the API did not start within 60 s")


ROW = "{:<40} {:>10} {:>6} {:<22} {:>8} {:>10} {:>7}"


def upload(client: httpx.Client, poller: Poller, pid: int, filename: str, data: bytes) -> tuple:
    """(status, error code, seconds, worst /healthz ms, peak RSS growth MB) of one upload."""
    time.sleep(0.2)
    before = proc_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
    poller.worst = 0.0
    start = time.perf_counter()
    resp = client.post("/v1/datasets", files={"file": (filename, data)})
    seconds = time.perf_counter() - start
    time.sleep(0.1)  # one more /healthz after the upload
    growth = (proc_kb(pid, "VmHWM") - before) / 1024
    code = resp.json().get("error_code", "-") if resp.status_code >= 400 else "-"
    return resp.status_code, code, seconds, poller.worst * 1000, growth


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small archives, a few seconds")
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        server = start_api(tmp, port)
        try:
            poller = Poller(base)
            poller.start()
            client = httpx.Client(base_url=base, timeout=600)
            print(
                ROW.format(
                    "archive", "bytes", "status", "error_code", "seconds", "healthz_ms", "rss_MB"
                )
            )
            missed = False
            for label, filename, build in archives(args.smoke):
                data = build()
                status, code, seconds, worst_ms, growth = upload(
                    client, poller, server.pid, filename, data
                )
                missed |= status >= 500 or growth > RSS_TARGET_MB or worst_ms > HEALTHZ_TARGET_MS
                cells = (f"{seconds:.2f}", f"{worst_ms:.0f}", f"{growth:.0f}")
                print(ROW.format(label, len(data), status, code, *cells))
            poller.stopped.set()
            poller.join()
            print(
                f"targets: no 5xx, RSS growth < {RSS_TARGET_MB} MB, /healthz < "
                f"{HEALTHZ_TARGET_MS} ms: {'MISSED' if missed else 'met'}"
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()

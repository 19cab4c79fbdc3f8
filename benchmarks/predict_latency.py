"""Hosted predictions against a bare onnxruntime `session.run`, measured in one run.

Exports EfficientNet-Lite0 at 224 px (10 classes) to ONNX exactly as a job does, registers it
as a succeeded job of the embedded default (SQLite and the local store under a temporary
folder), starts `finetune serve --no-worker` on loopback, then alternates round by round:
- bare: `session.run` on the same preprocessed image (one image; a batch of 32), in this
  process, with the same onnxruntime threads as the API;
- HTTP: `POST /v1/jobs/{id}/predict` with the PNG (one image; 32 images): the multipart body
  is encoded once and sent over one keep-alive connection (http.client), so the figure is
  the server's and the loopback's, not a client library's encoding (httpx adds about 1 ms).
- floor: the same single-image request to a raw ASGI app on uvicorn that only decodes,
  preprocesses and runs the model with the API's onnxruntime options (no framework,
  database, auth, multipart parser or JSON schema): what any HTTP service must pay for this
  request here, so `API - floor` is what the service itself adds.
Targets (issue 13): single-image p50 <= 1.3x bare, batch-of-32 throughput >= 0.8x bare.
The PNGs are 256x256 random noise, the costliest kind to decode for their size; a JPEG photo
(scikit-image's astronaut at 256 px) is measured beside them, for what users usually send.
Then a locust run (8 users, no wait) for `--load-seconds` counts failed requests (target 0).

    .venv/bin/python benchmarks/predict_latency.py [--requests 60] [--rounds 3]
        [--load-seconds 60] [--spin] [--smoke]

`--spin` runs the API (PREDICT_SPIN=true) and the floor with onnxruntime's threads
busy-waiting between runs, as the bare session does.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core import imaging  # noqa: E402
from core.db import migrate, session_scope  # noqa: E402
from core.models import DEFAULT_TENANT, Dataset, Job  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.storage import get_store  # noqa: E402

SIZE, CLASSES, BATCH = 224, 10, 32


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_model(out: Path, size: int) -> dict:
    """lite0 with a 10-class head, exported and verified as a job does."""
    import torch

    from core.backbones import BACKBONES
    from core.jobspec import JobSpec
    from worker.training.backbones import build_architecture
    from worker.training.export import build_metadata
    from worker.training.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_architecture(BACKBONES["efficientnet_lite0"], CLASSES).eval()
    config = JobSpec(image_size=size)
    metadata = build_metadata(config, [f"c{i}" for i in range(CLASSES)], {}, {})
    check = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    metadata["onnx"] = export_onnx(model, size, out / "model.onnx", check)
    (out / "metadata.json").write_text(json.dumps(metadata))
    return metadata


def register_job(settings: Settings, model_dir: Path) -> str:
    migrate(settings)
    store = get_store(settings)
    job_id = "job_predictbench"
    for name in ("model.onnx", "metadata.json"):
        store.put_file(f"jobs/{job_id}/model/{name}", model_dir / name)
    with session_scope(settings) as s:
        s.add(
            Dataset(
                id="ds_bench",
                tenant_id=DEFAULT_TENANT,
                name="bench",
                archive_key="datasets/ds_bench/archive.zip",
                index_key="datasets/ds_bench/index.json",
                size_bytes=0,
                sha256="0" * 64,
                num_images=0,
                classes=[f"c{i}" for i in range(CLASSES)],
                class_counts={},
            )
        )
        s.add(
            Job(
                id=job_id,
                tenant_id=DEFAULT_TENANT,
                dataset_id="ds_bench",
                status="succeeded",
                config={"backbone": "efficientnet_lite0"},
                result={
                    "bundle_key": f"jobs/{job_id}/model/model.onnx",
                    "onnx_key": f"jobs/{job_id}/model/model.onnx",
                    "metadata_key": f"jobs/{job_id}/model/metadata.json",
                },
            )
        )
        s.commit()
    return job_id


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def photo_jpeg() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.BICUBIC).save(
        buf, "JPEG", quality=90
    )
    return buf.getvalue()


class Poster:
    """POST prepared multipart bodies over one keep-alive connection (reopened if the
    server closed it while idle: uvicorn's keep-alive timeout is 5 s)."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    @staticmethod
    def body(files: list[tuple[str, bytes, str]]) -> tuple[bytes, dict[str, str]]:
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{name}"\r\nContent-Type: {kind}\r\n\r\n'.encode()
            + content
            + b"\r\n"
            for name, content, kind in files
        ]
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}

    def post(self, prepared: tuple[bytes, dict[str, str]]) -> dict:
        for attempt in (0, 1):
            try:
                self.conn.request("POST", self.path, body=prepared[0], headers=prepared[1])
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (ConnectionError, http.client.RemoteDisconnected):
                self.conn.close()
                if attempt:
                    raise
        assert resp.status == 200, data[:300]
        return json.loads(data)


def wait_ready(
    url: str, proc: subprocess.Popen, timeout: float = 120, path: str = "/healthz"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the server did not start")


LOCUSTFILE = """
from locust import FastHttpUser, task
IMAGE = open({image!r}, "rb").read()
class Predict(FastHttpUser):
    @task
    def predict(self):
        with self.client.post({path!r}, files={{"files": ("x.png", IMAGE, "image/png")}},
                              catch_response=True) as r:
            if r.status_code != 200 or '"top"' not in r.text:
                r.failure(f"status {{r.status_code}}")
"""


FLOOR_APP = """
import json
import sys

sys.path.insert(0, @REPO@)
from core import imaging
from core.inference import _session

META = json.loads(open(@METADATA@).read())
SESSION = _session(open(@MODEL@, "rb").read(), @THREADS@, @SPIN@)
INPUT = SESSION.get_inputs()[0].name


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":  # ready
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    start, end = body.index(b"\\r\\n\\r\\n") + 4, body.rindex(b"\\r\\n--")
    image = imaging.decode_upload(body[start:end], 10**8)
    logits = SESSION.run(None, {INPUT: imaging.preprocess([image], META)})[0]
    answer = json.dumps({"count": 1, "top": int(logits[0].argmax())}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})
"""


def start_floor(tmp: Path, spin: bool, log) -> tuple[subprocess.Popen, int]:
    """The raw ASGI floor app on uvicorn (httptools and uvloop, as `finetune serve`)."""
    code = FLOOR_APP
    for key, value in {
        "@REPO@": repr(str(REPO)),
        "@METADATA@": repr(str(tmp / "model" / "metadata.json")),
        "@MODEL@": repr(str(tmp / "model" / "model.onnx")),
        "@SPIN@": repr(spin),
        "@THREADS@": repr(int(os.environ.get("PREDICT_THREADS", "0"))),  # as the API's
    }.items():
        code = code.replace(key, value)
    (tmp / "floor_app.py").write_text(code)
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "floor_app:app", "--app-dir", str(tmp)]
    cmd += ["--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    return proc, port


def load_test(url: str, path: str, image: bytes, seconds: int, tmp: Path) -> dict:
    (tmp / "x.png").write_bytes(image)
    locustfile = tmp / "locustfile.py"
    locustfile.write_text(textwrap.dedent(LOCUSTFILE.format(image=str(tmp / "x.png"), path=path)))
    prefix = tmp / "locust"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "-u",
        "8",
        "-r",
        "8",
        "-t",
        f"{seconds}s",
        "--host",
        url,
        "--csv",
        str(prefix),
        "--only-summary",
    ]
    subprocess.run(cmd, check=False, capture_output=True, timeout=seconds + 120)
    rows = (prefix.parent / "locust_stats.csv").read_text().splitlines()
    header = rows[0].split(",")
    total = dict(zip(header, rows[-1].split(","), strict=False))
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "rps": float(total["Requests/s"]),
        "p50_ms": float(total["50%"]),
        "p99_ms": float(total["99%"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60, help="per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load-seconds", type=int, default=60)
    parser.add_argument("--spin", action="store_true", help="PREDICT_SPIN=true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: does it run")
    args = parser.parse_args()
    size = SIZE
    if args.smoke:
        args.requests, args.rounds, args.load_seconds, size = 3, 1, 3, 96
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "model").mkdir()
        metadata = build_model(tmp / "model", size)
        settings = Settings(data_dir=tmp / "var", database_url="", broker_url="")
        job_id = register_job(settings, tmp / "model")
        import onnxruntime as ort

        options = ort.SessionOptions()
        session = ort.InferenceSession(
            str(tmp / "model" / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        images = [png(i) for i in range(BATCH)]
        jpeg = photo_jpeg()
        decoded = [imaging.decode_upload(b, 10**8) for b in images]
        one = imaging.preprocess(decoded[:1], metadata)
        batch = imaging.preprocess(decoded, metadata)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "DATA_DIR": str(tmp / "var"),
            "DATABASE_URL": "",
            "BROKER_URL": "",
            "AUTH_ENABLED": "false",
            "RATE_LIMIT_PER_MINUTE": str(10**9),
            "PREDICT_SPIN": str(args.spin).lower(),
        }
        cmd = [sys.executable, "-m", "cli", "serve", "--no-worker", "--port", str(port)]
        log = open(tmp / "serve.log", "wb")  # noqa: SIM115
        floor, floor_port = start_floor(tmp, args.spin, log)
        try:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        except BaseException:
            floor.terminate()
            raise
        try:
            wait_ready(url, proc)
            wait_ready(f"http://127.0.0.1:{floor_port}", floor, path="/")
            path = f"/v1/jobs/{job_id}/predict"
            poster = Poster(port, path)
            single = poster.body([("x.png", images[0], "image/png")])
            photo = poster.body([("photo.jpg", jpeg, "image/jpeg")])
            many = poster.body([(f"x{i}.png", b, "image/png") for i, b in enumerate(images)])
            poster.post(single)  # loads the model
            floor_poster = Poster(floor_port, "/")
            bare1, pipe1, http1, bare32, http32, jpeg1, floor1 = [], [], [], [], [], [], []
            for _ in range(args.rounds):
                for _ in range(args.requests):
                    t = time.perf_counter()
                    session.run(None, {"input": one})
                    bare1.append(time.perf_counter() - t)
                for _ in range(args.requests):  # decode + preprocess + run, no HTTP
                    t = time.perf_counter()
                    img = imaging.decode_upload(images[0], 10**8)
                    session.run(None, {"input": imaging.preprocess([img], metadata)})
                    pipe1.append(time.perf_counter() - t)
                for _ in range(args.requests):
                    t = time.perf_counter()
                    poster.post(single)
                    http1.append(time.perf_counter() - t)
                for _ in range(args.requests):
                    t = time.perf_counter()
                    floor_poster.post(single)
                    floor1.append(time.perf_counter() - t)
                for _ in range(args.requests):
                    t = time.perf_counter()
                    poster.post(photo)
                    jpeg1.append(time.perf_counter() - t)
                for _ in range(max(1, args.requests // 8)):
                    t = time.perf_counter()
                    session.run(None, {"input": batch})
                    bare32.append(time.perf_counter() - t)
                for _ in range(max(1, args.requests // 8)):
                    t = time.perf_counter()
                    assert poster.post(many)["count"] == BATCH
                    http32.append(time.perf_counter() - t)
            p50 = {
                k: statistics.median(v)
                for k, v in {
                    "bare1": bare1,
                    "http1": http1,
                    "bare32": bare32,
                    "http32": http32,
                    "pipe1": pipe1,
                    "jpeg1": jpeg1,
                    "floor1": floor1,
                }.items()
            }
            load = load_test(url, path, images[0], args.load_seconds, tmp)
        finally:
            floor.terminate()
            proc.terminate()
            proc.wait(30)
            floor.wait(30)
    spin = "spinning" if args.spin else "sleeping (PREDICT_SPIN=false)"
    print(
        f"lite0 at {size} px, {CLASSES} classes; {args.rounds} rounds x {args.requests}; "
        f"the API's onnxruntime threads {spin}, the bare session's spinning (the default)"
    )
    print(
        f"single image p50: bare session.run {1000 * p50['bare1']:.2f} ms, "
        f"HTTP {1000 * p50['http1']:.2f} ms, ratio {p50['http1'] / p50['bare1']:.2f} "
        "(target <= 1.3)"
    )
    print(
        f"single image, in this process without HTTP (decode + preprocess + run): "
        f"{1000 * p50['pipe1']:.2f} ms, ratio {p50['pipe1'] / p50['bare1']:.2f}; "
        f"a 256-px JPEG photo through HTTP: {1000 * p50['jpeg1']:.2f} ms, "
        f"ratio {p50['jpeg1'] / p50['bare1']:.2f}"
    )
    print(
        f"single image through the raw-ASGI floor: {1000 * p50['floor1']:.2f} ms, ratio "
        f"{p50['floor1'] / p50['bare1']:.2f}; the API adds "
        f"{1000 * (p50['http1'] - p50['floor1']):.2f} ms over the floor"
    )
    thr_bare, thr_http = BATCH / p50["bare32"], BATCH / p50["http32"]
    print(
        f"batch of {BATCH}: bare {thr_bare:.1f} img/s, HTTP {thr_http:.1f} img/s, "
        f"ratio {thr_http / thr_bare:.2f} (target >= 0.8)"
    )
    print(
        f"locust 8 users {args.load_seconds} s: {load['requests']} requests, "
        f"{load['failures']} failed, {load['rps']:.1f} req/s, p50 {load['p50_ms']:.0f} ms, "
        f"p99 {load['p99_ms']:.0f} ms (target: 0 failed)"
    )
    if load["failures"] or load["requests"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()

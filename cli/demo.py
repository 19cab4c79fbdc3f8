"""The README's first command: the whole product, end to end, as a user would drive it.

Starts the service (API + a worker child process) on the embedded default, builds a
labeled-image dataset from scikit-learn's digits, then, as a user would, through the Python
client (`client/`) and the CLI's live bar: uploads it, submits a job, follows it, downloads
the model, and measures its accuracy on held-out digits the service never saw, using only
the downloaded files.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from cli.admin import announce_auth
from cli.supervisor import exit_on_signal, stop_process
from cli.user.jobs import live
from client import ApiError, Client
from core.settings import Settings, get_settings


def digits_split(
    seed: int = 0,
) -> tuple[list[tuple[np.ndarray, int]], list[tuple[np.ndarray, int]]]:
    """(train, held_out): 8x8 digits as uint8 images, 20% held out per class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=seed
    )

    def pick(idx: np.ndarray) -> list[tuple[np.ndarray, int]]:
        return [(images[i], int(digits.target[i])) for i in idx]

    return pick(idx_train), pick(idx_test)


def imagefolder_zip(samples: list[tuple[np.ndarray, int]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for i, (img, label) in enumerate(samples):
            buf = io.BytesIO()
            Image.fromarray(img, mode="L").save(buf, format="PNG")
            zf.writestr(f"digits/{label}/{i:05d}.png", buf.getvalue())
    return path


def wait_ready(client: Client, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode}")
        try:
            if client.readyz():
                return
        except ApiError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the service did not become ready in time")


def evaluate_download(model_zip: Path, held_out: list[tuple[np.ndarray, int]]) -> float:
    """Accuracy of the downloaded TorchScript model, preprocessing from metadata.json."""
    import json

    import torch

    from worker.training.export import preprocess

    out = model_zip.parent / "model"
    with zipfile.ZipFile(model_zip) as zf:
        zf.extractall(out)
    metadata = json.loads((out / "metadata.json").read_text())
    model = torch.jit.load(str(out / "model.torchscript.pt"), map_location="cpu").eval()
    classes = metadata["class_names"]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(held_out), 128):
            chunk = held_out[start : start + 128]
            batch = preprocess([Image.fromarray(img, mode="L") for img, _ in chunk], metadata)
            preds = model(batch).argmax(1).tolist()
            correct += sum(
                classes[p] == str(label) for p, (_, label) in zip(preds, chunk, strict=True)
            )
    return correct / len(held_out)


def demo_auth(settings: Settings) -> str:
    """The demo's own read/write key for the default tenant (auth on), after making sure an
    admin key exists and printing it the one time it is created."""
    if not settings.auth_enabled:
        return ""
    from core.db import migrate, session_scope
    from core.models import DEFAULT_TENANT, Tenant
    from core.tenancy import create_key

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings)
    announce_auth(settings)
    with session_scope(settings) as session:
        tenant = session.get(Tenant, DEFAULT_TENANT)
        assert tenant is not None
        key, token = create_key(session, tenant, ["read", "write"], name="demo key")
        session.commit()
    print(f"the demo uses API key {key.id} (read, write) of tenant {DEFAULT_TENANT!r}")
    return token


def run_demo(
    host: str, port: int, epochs: int, image_size: int, backbone: str, keep_running: bool
) -> int:
    settings = get_settings()
    demo_dir = settings.data_dir / "demo"
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "service.log"
    base = f"http://{host}:{port}"
    token = demo_auth(settings)
    print(f"starting the service at {base} (logs: {log_path})")
    # SIGTERM must reach `finally`, which stops the service and, through it, its workers.
    signal.signal(signal.SIGTERM, exit_on_signal)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--host", host, "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        with Client(base, api_key=token) as client:
            wait_ready(client, proc)
            train, held_out = digits_split()
            archive = imagefolder_zip(train, demo_dir / "digits.zip")
            ds = client.datasets.upload(archive, name="sklearn-digits")
            print(f"uploaded dataset {ds.id}: {ds.num_images} images in {ds.num_classes} classes")
            job = client.jobs.submit(
                ds.id,
                backbone=backbone,
                epochs=epochs,
                image_size=image_size,
                batch_size=32,
                learning_rate=1e-3,
                augmentation={"hflip": False},  # digits are not mirror-symmetric
            )
            job_id = job.id
            print(f"submitted job {job_id} ({backbone}, {epochs} epochs at {image_size}px)")
            started = time.monotonic()
            job = live(client, job_id)
            wall = time.monotonic() - started
            if job.status != "succeeded":
                err = job.error
                print(f"job {job_id} {job.status}: {err and err.code}: {err and err.message}")
                return 1
            best = job.best_metrics or {}
            print(
                f"job {job_id} succeeded in {wall:.1f}s; best validation accuracy "
                f"{best.get('val_accuracy', 0):.3f} (epoch {best.get('epoch')})"
            )
            model_zip = client.jobs.download(job_id, demo_dir / "model.zip")
            accuracy = evaluate_download(model_zip, held_out)
            print(f"downloaded {model_zip} ({model_zip.stat().st_size / 1e6:.1f} MB)")
            print(f"held-out accuracy on {len(held_out)} unseen digits: {accuracy:.3f}")
            print(
                f"DEMO_RESULT job={job_id} wall_seconds={wall:.1f} held_out_accuracy={accuracy:.4f}"
            )
        if not keep_running:
            return 0
        auth = f'-H "Authorization: Bearer {token}" ' if token else ""
        print(
            f"\nthe service keeps running at {base} — try:\n"
            f"  curl {auth}{base}/v1/jobs/{job_id}\n"
            f"  curl {auth}{base}/v1/jobs/{job_id}/metrics\n"
            f"  curl -L -o model.zip {auth}{base}/v1/jobs/{job_id}/model\n"
            f"  curl {auth}-F file=@{archive} {base}/v1/datasets\n"
            f"or the CLI (`finetune login --url {base}` first):\n"
            f"  finetune jobs show {job_id}\n"
            f"  finetune predict {job_id} IMAGE.png\n"
            f"open {base}/docs for the API; Ctrl-C to stop."
        )
        proc.wait()
        return 0
    except KeyboardInterrupt:
        print("\nstopping")
        return 0
    finally:
        # The service stops its API, then its workers, each within STOP_GRACE_SECONDS, and
        # kills what is left; killing it first would orphan its worker children.
        stop_process(proc, timeout=2 * settings.stop_grace_seconds + 15)

"""The README's first command: the whole product, end to end, as a user would drive it.

Starts the service (API + a worker child process) on the embedded default, builds a
labeled-image dataset from scikit-learn's digits, uploads it over HTTP, submits a job,
shows a progress bar while it trains, downloads the model, and measures its accuracy on
held-out digits the service never saw, using only the downloaded files.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from cli.admin import announce_auth
from cli.supervisor import exit_on_signal, stop_process
from core.settings import Settings, get_settings

TERMINAL = {"succeeded", "failed", "canceled"}


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


def wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the service did not become ready in time")


def follow_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Poll the job and draw a progress bar until it ends."""
    bar = tqdm(total=1, unit="step", desc="queued", dynamic_ncols=True)
    job: dict[str, Any] = {}
    try:
        while True:
            job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
            prog = job["progress"]
            if prog["total_steps"] and bar.total != prog["total_steps"]:
                bar.reset(total=prog["total_steps"])
            bar.n = prog["step"] if job["status"] != "succeeded" else bar.total
            bar.set_description(
                f"{job['status']}/{prog['phase'] or '-'} "
                f"epoch {prog['epoch']}/{prog['total_epochs']}"
            )
            post = {}
            if job["latest_metrics"]:
                post["val_acc"] = f"{job['latest_metrics'].get('val_accuracy') or 0:.3f}"
            if prog["eta_seconds"] is not None and job["status"] == "running":
                post["eta"] = f"{prog['eta_seconds']:.0f}s"
            bar.set_postfix(post)
            bar.refresh()
            if job["status"] in TERMINAL:
                return job
            time.sleep(0.5)
    finally:
        bar.close()


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


def demo_auth(settings: Settings) -> dict[str, str]:
    """The demo's own read/write key for the default tenant (auth on), after making sure an
    admin key exists and printing it the one time it is created."""
    if not settings.auth_enabled:
        return {}
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
    return {"Authorization": f"Bearer {token}"}


def run_demo(
    host: str, port: int, epochs: int, image_size: int, backbone: str, keep_running: bool
) -> int:
    settings = get_settings()
    demo_dir = settings.data_dir / "demo"
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "service.log"
    base = f"http://{host}:{port}"
    headers = demo_auth(settings)
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
        with httpx.Client(
            base_url=base, timeout=60, headers=headers, follow_redirects=True
        ) as client:
            wait_ready(client, proc)
            train, held_out = digits_split()
            archive = imagefolder_zip(train, demo_dir / "digits.zip")
            with open(archive, "rb") as f:
                resp = client.post(
                    "/v1/datasets",
                    files={"file": ("digits.zip", f, "application/zip")},
                    data={"name": "sklearn-digits"},
                )
            resp.raise_for_status()
            ds = resp.json()
            print(
                f"uploaded dataset {ds['id']}: {ds['num_images']} images "
                f"in {ds['num_classes']} classes"
            )

            resp = client.post(
                "/v1/jobs",
                json={
                    "dataset_id": ds["id"],
                    "backbone": backbone,
                    "epochs": epochs,
                    "image_size": image_size,
                    "batch_size": 32,
                    "learning_rate": 1e-3,
                    # Digits are not mirror-symmetric: no flips.
                    "augmentation": {"hflip": False},
                },
            )
            resp.raise_for_status()
            job_id = resp.json()["id"]
            print(f"submitted job {job_id} ({backbone}, {epochs} epochs at {image_size}px)")
            started = time.monotonic()
            job = follow_job(client, job_id)
            wall = time.monotonic() - started
            if job["status"] != "succeeded":
                err = job.get("error") or {}
                print(f"job {job_id} {job['status']}: {err.get('code')}: {err.get('message')}")
                return 1
            best = job["best_metrics"] or {}
            print(
                f"job {job_id} succeeded in {wall:.1f}s; best validation accuracy "
                f"{best.get('val_accuracy', 0):.3f} (epoch {best.get('epoch')})"
            )
            model_zip = demo_dir / "model.zip"
            with client.stream("GET", f"/v1/jobs/{job_id}/model") as r:
                r.raise_for_status()
                with open(model_zip, "wb") as out:
                    for chunk in r.iter_bytes():
                        out.write(chunk)
            accuracy = evaluate_download(model_zip, held_out)
            print(f"downloaded {model_zip} ({model_zip.stat().st_size / 1e6:.1f} MB)")
            print(f"held-out accuracy on {len(held_out)} unseen digits: {accuracy:.3f}")
            print(
                f"DEMO_RESULT job={job_id} wall_seconds={wall:.1f} held_out_accuracy={accuracy:.4f}"
            )
        if not keep_running:
            return 0
        auth = f'-H "Authorization: {headers["Authorization"]}" ' if headers else ""
        print(
            f"\nthe service keeps running at {base} — try:\n"
            f"  curl {auth}{base}/v1/jobs/{job_id}\n"
            f"  curl {auth}{base}/v1/jobs/{job_id}/metrics\n"
            f"  curl -L -o model.zip {auth}{base}/v1/jobs/{job_id}/model\n"
            f"  curl {auth}-F file=@{archive} {base}/v1/datasets\n"
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

"""The user's CLI end to end, as a person types it, against a real API process and a real
worker: `finetune login`, `datasets upload ./folder`, `jobs submit --dataset ... --watch`,
`jobs download ...`, `predict`, with their exit codes and their `--json`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import noise_image, png_bytes

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def make_cli(tmp_path: Path):
    """`finetune ARGS...` in a subprocess with its own config folder and no FINETUNE_*
    variables, so what `login` saved is what the commands use."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINETUNE_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), OMP_NUM_THREADS="1", COLUMNS="120")
    # The repository first: an editable install made before `client/` existed maps only
    # the packages it knew.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))

    def finetune(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return finetune


def test_upload_a_folder_train_with_watch_download_and_predict(
    server_url, worker_process, tmp_path
):
    finetune = make_cli(tmp_path)
    out = finetune("login", "--url", server_url, "--api-key", "")
    assert out.returncode == 0, out.stderr
    config = tmp_path / "config" / "finetune" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text())["url"] == server_url

    folder = tmp_path / "shapes"
    for c, cls in enumerate(["circle", "square"]):
        (folder / cls).mkdir(parents=True)
        for i in range(8):
            (folder / cls / f"{i}.png").write_bytes(png_bytes(noise_image(10 * c + i, 24)))
    up = finetune("datasets", "upload", str(folder), "--name", "shapes")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "16 images, 2 classes" in up.stdout and "square" in up.stdout  # the report
    assert "ingested" in up.stderr  # the byte bar, done
    dataset = json.loads(finetune("datasets", "list", "--json").stdout)["data"][0]
    assert (dataset["name"], dataset["num_images"]) == ("shapes", 16)
    shown = json.loads(finetune("datasets", "show", dataset["id"], "--json").stdout)
    assert [c["name"] for c in shown["classes"]] == ["circle", "square"]

    run = finetune(
        "jobs",
        "submit",
        "--dataset",
        dataset["id"],
        "--recipe",
        "manual",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--budget",
        "120",
        "--param",
        "batch_size=8",
        "--watch",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "succeeded" in run.stdout
    assert "step" in run.stderr and "%" in run.stderr  # the live bar
    job_id = run.stdout.split("submitted job ", 1)[1].split()[0]

    model = tmp_path / "model.zip"
    got = finetune("jobs", "download", job_id, "-o", str(model))
    assert got.returncode == 0, got.stderr
    assert {"model.onnx", "metadata.json"} <= set(zipfile.ZipFile(model).namelist())
    onnx = finetune("jobs", "download", job_id, "--format", "onnx", "--json")
    assert onnx.returncode == 0, onnx.stdout
    assert Path(json.loads(onnx.stdout)["path"]).stat().st_size > 1000

    image = folder / "circle" / "0.png"
    pred = finetune("predict", job_id, str(image), "--json")
    assert pred.returncode == 0, pred.stdout + pred.stderr
    top = json.loads(pred.stdout)["data"][0]["top"]
    assert {t["label"] for t in top} == {"circle", "square"}

    models = json.loads(finetune("models", "list", "--json").stdout)["data"]
    ref = next(f"{x['name']}@{x['version']}" for x in models if x["job_id"] == job_id)
    by_ref = finetune("predict", ref, str(image), "--top-k", "1", "--json")
    assert by_ref.returncode == 0, by_ref.stdout + by_ref.stderr
    assert json.loads(by_ref.stdout)["job_id"] == job_id

    listed = json.loads(finetune("jobs", "list", "--status", "succeeded", "--json").stdout)
    assert job_id in [j["id"] for j in listed["data"]]
    watched = finetune("jobs", "watch", job_id, "--json")
    assert watched.returncode == 0 and json.loads(watched.stdout)["status"] == "succeeded"

    for args, expect in [
        (("jobs", "show", job_id), "succeeded"),
        (("jobs", "list"), job_id),
        (("datasets", "show", dataset["id"]), "circle"),
        (("models", "list"), ref),
        (("models", "show", ref), job_id),
        (("predict", job_id, str(image)), "0.png"),
        (("whoami",), "default"),
    ]:
        human = finetune(*args)
        assert human.returncode == 0 and expect in human.stdout, (args, human.stdout, human.stderr)

    # The exit codes: the API refused (3), a job that did not succeed (1).
    missing = finetune("jobs", "show", "nope", "--json")
    assert missing.returncode == 3 and json.loads(missing.stdout)["error_code"] == "JOB_NOT_FOUND"
    queued = json.loads(finetune("jobs", "submit", "-d", dataset["id"], "--json").stdout)
    assert finetune("jobs", "cancel", queued["id"]).returncode == 0
    assert finetune("jobs", "watch", queued["id"]).returncode == 1

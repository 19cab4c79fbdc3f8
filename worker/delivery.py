"""What a job that keeps a model delivers: the model files (verified ONNX, safetensors,
TorchScript, metadata and the model card), its plots, and the outcome the job row records.

`export` writes the files on local disk; `publish` uploads them and returns the job's
`result`. Called by `worker/lifecycle.py` once the end is decided and keeps a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.attempt import Attempt, Trained
from worker.planning import budget_warnings
from worker.training.card import render_card
from worker.training.export import build_metadata, export_checks, export_model
from worker.training.plots import confusion_matrix_png


def export(run: Attempt, trained: Trained) -> tuple[dict[str, Path], list[str]]:
    """The model files, on local disk, the confusion-matrix plot, and what the user must
    know about the export (an ONNX file that failed its check is left out, said here)."""
    run.reporter.on_phase("exporting")
    result = trained.result
    provenance = {
        "job_id": run.job_id,
        "dataset_id": run.claim.dataset_id,
        "dataset_sha256": run.claim.dataset_sha,
    }
    thresholds = result.extra.get("thresholds")  # multi-label only
    metadata = build_metadata(
        trained.config, result.classes, result.best, provenance, thresholds=thresholds
    )
    config = trained.config
    checks = export_checks(trained.data, config)

    def card(meta: dict[str, Any]) -> str:
        said = budget_warnings(trained)
        return render_card(meta, result.report, trained.data.split, result.extra, said)

    files, warned = export_model(
        result.model, metadata, run.workdir / "model", checks, config.export_int8, card
    )
    validation = result.report.get("validation", {})
    # A multi-label report has no confusion matrix (an image may have several classes).
    if thresholds is None and "confusion_matrix" in validation:
        run.store.put_bytes(
            f"jobs/{run.job_id}/plots/confusion_matrix.png",
            confusion_matrix_png(validation["confusion_matrix"], result.classes),
        )
    return files, warned


def publish(
    run: Attempt, trained: Trained, files: dict[str, Path], warned: list[str]
) -> dict[str, Any]:
    """Upload the model files; the outcome the job row records."""
    keys = {}
    for name, path in files.items():
        keys[name] = key = f"jobs/{run.job_id}/model/{name}"
        run.store.put_file(key, path)
    result = trained.result
    return {
        "bundle_key": keys["model.zip"],
        "safetensors_key": keys["model.safetensors"],
        "torchscript_key": keys["model.torchscript.pt"],
        "metadata_key": keys["metadata.json"],
        # Absent when the export failed its check (the warnings say why).
        "onnx_key": keys.get("model.onnx"),
        "onnx_int8_key": keys.get("model.int8.onnx"),
        "card_key": keys.get("README.md"),
        "best": result.best,
        "report": result.report,
        "training": {
            **result.extra,
            "stopped_reason": result.stopped_reason,
            "checkpoint_seconds": [round(t, 3) for t in run.reporter.checkpoint_seconds],
        },
        "classes": result.classes,
        "device": result.device,
        "split": trained.data.split,
        "warnings": budget_warnings(trained) + warned,
    }

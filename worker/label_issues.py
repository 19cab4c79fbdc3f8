"""After export, for a job that succeeded: its suspect training labels (confident learning,
`worker/training/label_issues.py`) and the validation images its model gets most wrong,
stored beside the model:

    jobs/{job_id}/label_issues.json        every flagged image, most suspect first
    jobs/{job_id}/plots/label_issues.png   thumbnails of the first ones
    jobs/{job_id}/plots/top_losses.png     the validation images with the highest loss

The summary it returns goes in the job's result (`training.label_issues`). It is advice,
not the model: any failure here is logged and recorded in that summary, never the job's.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from core.duplicates import duplicate_group_ids
from core.label_issues import label_issues_key
from worker.attempt import Attempt, Trained
from worker.datasets import fetch_dataset
from worker.ending import EndReason
from worker.training.label_issues import LabelIssuesSkipped, find_label_issues

log = logging.getLogger(__name__)

STOPPED = {
    EndReason.CANCELED_KEEP: "the job was canceled (stop-and-keep)",
    EndReason.TIME_LIMITED_KEPT: "the job stopped at its time limit (max_duration_seconds)",
}


def label_issues(run: Attempt, trained: Trained, reason: EndReason) -> dict[str, Any]:
    """Find, store and summarise the job's label issues. `{"skipped": why}` when none were
    computed: a job stopped by a cancel or its time limit was asked to stop, not to go on."""
    if reason is not EndReason.SUCCEEDED:
        why = STOPPED.get(reason, f"the job ended {reason.value}")
        return {"skipped": f"{why}; label issues are found when a job succeeds"}
    job_seconds = run.claim.prior_seconds + run.ran()
    start = time.monotonic()
    try:
        run.reporter.on_phase("finding label issues")
        c = run.claim
        _, index = fetch_dataset(run.settings, run.store, c.dataset_id, c.archive_key, c.index_key)
        entries = index["entries"]
        result = trained.result
        found = find_label_issues(
            result,
            trained.data,
            trained.config,
            [e.get("source") or e["path"] for e in entries],
            duplicate_group_ids(entries),
            torch.device(result.device),
        )
        run.store.put_bytes(label_issues_key(run.job_id), json.dumps(found.document()).encode())
        for name, png in (("label_issues", found.issues_png), ("top_losses", found.top_losses_png)):
            if png is not None:
                run.store.put_bytes(f"jobs/{run.job_id}/plots/{name}.png", png)
    except LabelIssuesSkipped as exc:
        log.info("job %s: no label issues: %s", run.job_id, exc)
        return {"skipped": str(exc)}
    except Exception as exc:  # noqa: BLE001 - advice only: the job keeps its model
        log.warning("job %s: finding label issues failed", run.job_id, exc_info=True)
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    seconds = time.monotonic() - start
    summary = {
        **found.summary(),
        "seconds": round(seconds, 3),
        "share_of_job": round(seconds / max(job_seconds + seconds, 1e-9), 4),
        "top_losses": len(found.top_losses),
    }
    log.info(
        "job %s: %d label issues in %d labelled images (%.2f s, %.1f%% of the job)",
        run.job_id,
        summary["count"],
        summary["images"],
        seconds,
        100 * summary["share_of_job"],
    )
    return summary

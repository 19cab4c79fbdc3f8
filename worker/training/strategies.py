"""The training strategies, each a short composition of the probe and fine-tuning.

- `linear_probe`: the backbone is frozen; features are computed once and cached, and only
  the head is fitted on them (logistic regression, its penalty cross-validated: seconds);
- `full`: everything trains; the backbone's learning rate is `learning_rate x
  backbone_lr_mult` (default 1.0);
- `lp_ft` (default): a linear probe first (on cached features), then
  everything trains with a lower backbone learning rate, so the random head does not wreck
  the pretrained features in the first steps;
- `gradual`: the backbone unfreezes from the top, a stage more each epoch, spread so the
  whole network trains by the last epoch.

A resumed run (`resume`, a checkpoint) never probes again: the checkpoint is past the probe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.training.finetune import fine_tune
from worker.training.optim import backbone_stages
from worker.training.probe import train_probe
from worker.training.run import Run

Resume = dict[str, Any] | None


def linear_probe(run: Run, resume: Resume) -> None:
    if resume is None:
        run.extra["probe"] = train_probe(run, report_epochs=True)


def lp_ft(run: Run, resume: Resume) -> None:
    if resume is None:
        run.extra["probe"] = train_probe(run, report_epochs=False)
        if run.control.reason is not None:
            return
        run.checkpoint("probe", 0)
    fine_tune(run, resume)


def full(run: Run, resume: Resume) -> None:
    fine_tune(run, resume)


def gradual(run: Run, resume: Resume) -> None:
    fine_tune(run, resume, stages=backbone_stages(run.model))


STRATEGIES: dict[str, Callable[[Run, Resume], None]] = {
    "linear_probe": linear_probe,
    "full": full,
    "lp_ft": lp_ft,
    "gradual": gradual,
}

"""The auto recipe and the time budget, as a job lives them: the recipe is chosen once,
recorded on the job row before training starts, and the budget counts the job's whole
running time (every attempt, download and planning included)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from core import transitions
from core.db import session_scope
from core.jobspec import JobConfig
from worker.attempt import Attempt, Trained
from worker.failures import JobLost
from worker.training import recipe
from worker.training.fit import spec_device
from worker.training.runtime import pick_device
from worker.training.weights import WeightsSource


def budget_deadline(run: Attempt, config: JobConfig) -> float | None:
    """When `time_budget_seconds` runs out (time.monotonic): the budget is the job's whole
    running time, this attempt's download and planning and every earlier attempt included."""
    if not config.time_budget_seconds:
        return None
    return run.started + config.time_budget_seconds - run.claim.prior_seconds


def choose_recipe(
    run: Attempt, config: JobConfig, archive: Path, index: dict[str, Any], weights: WeightsSource
) -> JobConfig:
    """The auto recipe's spec, recorded on the job row before training starts (a resumed
    attempt reads it back and does not plan again)."""
    planned = recipe.plan(
        config,
        config.pinned,
        archive,
        index,
        device=spec_device(config) or pick_device(),  # the job's `device`, as fit's
        weights=weights,
        deadline=budget_deadline(run, config),
        spent=run.claim.prior_seconds + run.ran(),
        on_phase=run.reporter.on_phase,
    )
    resolved = JobConfig.model_validate({**planned.spec.to_dict(), "plan": planned.record})
    with session_scope(run.settings) as s:
        if not transitions.record_plan(
            s, run.job_id, run.worker_id, resolved.model_dump(mode="json")
        ):
            raise JobLost(f"job {run.job_id} could not record its recipe")
    # Progress counts the epochs the recipe chose (the reporter began with the default's).
    run.reporter.on_plan(resolved.epochs)
    return resolved


def budget_warnings(trained: Trained) -> list[str]:
    """What the user must know about a model the time budget cut short."""
    result, config = trained.result, trained.config
    history = [h for h in result.history if h.get("phase") == "fine_tune"]
    fitted = result.extra.get("epochs_fitted_to_budget")
    budget = config.time_budget_seconds
    if result.stopped_reason == "time_budget" or (fitted is not None and fitted < config.epochs):
        done: float = len(history)
        if fitted is not None and result.stopped_reason is None and done == math.ceil(fitted):
            done = fitted  # the re-fit plan ran to its end, a shorter last epoch included
        # A plan the budget grew (a faster machine than measured) counts its grown epochs.
        planned = max(config.epochs, math.ceil(fitted or 0))
        return [
            f"the time budget ({budget:g} s) ended training after {done:g} of the "
            f"{planned} planned fine-tuning epochs; the model is the best epoch so far "
            f"(epoch {result.best.get('epoch')}); a larger time_budget_seconds trains longer"
        ]
    return []

"""The hyper-parameter search a job may ask for (`search: {"trials": N, "budget_seconds": T}`).

Plain data (no torch, no optuna): the API validates it; `worker/training/search.py` runs it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A trial shorter than this cannot extract features and train one epoch on a CPU.
MIN_TRIAL_SECONDS = 20.0


class SearchSpec(BaseModel):
    """Run `trials` training runs with sampled hyper-parameters inside `budget_seconds` (all
    runs together), then (`retrain_best`) the best trial's config again for as many epochs
    as the rest of the budget fits; the better of the two by validation is the job's model.
    `budget_seconds / trials` must be at least MIN_TRIAL_SECONDS: counted over the whole
    budget, of which the trials have half when `retrain_best` is on."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(8, ge=2, le=64)
    budget_seconds: float = Field(ge=10.0, le=7 * 24 * 3600.0)
    retrain_best: bool = Field(
        True,
        description="half the budget (and what the trials leave) trains the best trial's "
        "config again for as many epochs as fit, delivered unless it validates lower than "
        "the best trial; false: the trials have the whole budget",
    )

    @model_validator(mode="after")
    def _room_for_one_trial(self) -> SearchSpec:
        per_trial = self.budget_seconds / self.trials
        if per_trial < MIN_TRIAL_SECONDS:
            fitting = int(self.budget_seconds // MIN_TRIAL_SECONDS)
            fewer = f" or ask for at most {fitting} trials" if fitting >= 2 else ""
            raise ValueError(
                f"search.budget_seconds={self.budget_seconds:g} is too small for one trial: "
                f"{self.trials} trials would get {per_trial:.1f} s each and a trial needs at "
                f"least {MIN_TRIAL_SECONDS:g} s; raise budget_seconds to at least "
                f"{MIN_TRIAL_SECONDS * self.trials:g}{fewer}"
            )
        return self

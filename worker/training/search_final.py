"""The search's last run (`search.py`): the best trial's config trained again, for as many
epochs as the time the trials left fits.

Why: the trials are short (a share of the budget each), and at a few epochs a run is
limited by time, not by its hyper-parameters. On the proxies a trial rarely beats the
planned config beyond chance on the validation images, while the same config trained longer
scores higher (BENCHMARKS.md, "Search"). So the trials choose, and the time kept back
(`FINAL_SHARE` of the budget, plus whatever the trials left unused) trains the choice.

The epochs come from the best trial's own clock: what it took before its first fine-tuning
epoch (the probe's feature pass and probe) and per fine-tuning epoch, on this machine, at
this input size, with the image cache already prepared.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.jobspec import JobSpec
from worker.training.recipe import EPOCHS_CAP
from worker.training.search_space import MIN_FIT_SECONDS

# The share of the budget kept for the final run: the trials have the rest (the first of
# them, the job as planned, keeps its own time budget inside it).
FINAL_SHARE = 0.5


@dataclass(frozen=True)
class EpochClock:
    """One fit's measured times: seconds before its fine-tuning loop (setup, the probe's
    feature pass and probe), seconds per fine-tuning epoch, whole fine-tuning epochs done."""

    fixed: float
    per_epoch: float
    epochs: int

    @classmethod
    def measure(
        cls,
        fit_start: float,
        ends: list[tuple[int, float, float]],
        loop_start: float | None = None,
    ) -> EpochClock | None:
        """From the fit's start, its (epoch, time.monotonic(), share of the epoch's steps
        trained) at each epoch's end, and when its training loop began (the "training"
        phase, after the model, optimizer and loaders were set up). Epoch 0 (lp_ft's probe)
        is not a fine-tuning epoch; an epoch cut by the time budget counts for the share of
        it that ran. None when no fine-tuning epoch ran (a linear probe records its probe as
        epoch 1 with no training loop: the caller knows it by its strategy)."""
        before = [t for e, t, _ in ends if e < 1]
        began = loop_start if loop_start is not None else before[-1] if before else fit_start
        done, last_t, first_t, first_done = 0.0, began, None, 0.0
        for epoch, t, share in ends:
            if epoch < 1:
                continue
            done += share
            last_t = t
            if first_t is None:
                first_t, first_done = t, done
        if first_t is None or done <= 0:
            return None
        if done - first_done >= 0.5:  # the later epochs: past the first's warm-up and set-up
            per_epoch = (last_t - first_t) / (done - first_done)
        else:
            per_epoch = (last_t - began) / done
        per_epoch = max(per_epoch, 1e-3)
        return cls(max(0.0, began - fit_start), per_epoch, int(done + 1e-6))

    def epochs_in(self, seconds: float, cap: int = EPOCHS_CAP) -> int:
        """Fine-tuning epochs that fit in `seconds` (rounded, as the recipe rounds: the
        schedule is re-fitted after each epoch), at most `cap`."""
        return min(cap, int(max(0.0, seconds - self.fixed) / self.per_epoch + 0.5))


def final_spec(best: JobSpec, epochs: int, seconds: float, warmup_follows: bool) -> JobSpec:
    """`best` (a trial's spec) for `epochs` epochs in `seconds`. `warmup_follows`: the
    warm-up was the recipe's (not the user's), so it follows the epochs as the recipe sets
    it (up to two epochs, half the run at most)."""
    fields = best.model_dump(mode="json")
    fields.update(epochs=epochs, time_budget_seconds=seconds)
    if warmup_follows:
        fields["warmup_epochs"] = min(2.0, epochs / 2)
    return JobSpec.model_validate(fields)


@dataclass(frozen=True)
class Candidate:
    """A trial whose config the final run may train again: its number, validation score,
    spec and clock."""

    number: int
    value: float | None
    spec: JobSpec
    clock: EpochClock


def plan_final(
    base: Candidate | None, left: float, cap: int, warmup_follows: bool
) -> tuple[JobSpec | None, str]:
    """(the final run's spec, or None and why not): `base`'s config for as many epochs as
    `left` seconds fit, at most `cap`; only when that is more than `base` ran."""
    if base is None:
        return None, "no trial ran a fine-tuning epoch (linear probes: nothing to extend)"
    epochs = base.clock.epochs_in(left, cap)
    if left < MIN_FIT_SECONDS or epochs <= base.clock.epochs:
        return None, (
            f"{left:.0f} s left fit {epochs} fine-tuning epochs; trial {base.number + 1} "
            f"ran {base.clock.epochs}"
        )
    return final_spec(base.spec, epochs, left, warmup_follows), ""

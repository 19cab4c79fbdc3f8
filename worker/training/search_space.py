"""What a hyper-parameter search samples (`search.py` runs it): the space around the job's
own config, and the spec each trial trains with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna

from core.jobspec import JobSpec
from worker.training.recipe import LP_FT_LEARNING_RATE

MIN_FIT_SECONDS = 5.0  # JobSpec's least time_budget_seconds
# Input sizes a trial may use: the config's own, and the three largest of these below it.
IMAGE_SIZES = (32, 48, 64, 96, 128, 160)
PRESETS = ("none", "light", "standard")
LR_SPREAD = 10.0  # learning rate: log-uniform in [lr / 10, lr x 10]
WD_SPREAD = 5.0  # weight decay: log-uniform in [wd / 5, wd x 5]
WD_WHEN_ZERO = 1e-4  # the centre of the weight-decay range when the config has none


@dataclass(frozen=True)
class SearchSpace:
    """What the trials sample, centred on the config's values."""

    learning_rate: tuple[float, float]
    weight_decay: tuple[float, float]
    image_sizes: tuple[int, ...]
    presets: tuple[str, ...] | None  # None: the config lists explicit ops, kept as they are
    epochs: tuple[int, int]
    strategies: tuple[str, ...] = ()  # searched only when the recipe chose a linear probe

    @classmethod
    def around(cls, config: JobSpec) -> SearchSpace:
        lr = config.learning_rate
        strategies: tuple[str, ...] = ()
        pinned = getattr(config, "pinned", None) or []
        if (
            config.strategy == "linear_probe"
            and config.recipe == "auto"
            and "strategy" not in pinned
        ):
            # The recipe chose a probe because one job's budget fits no fine-tuning epoch;
            # the search's budget may: lp_ft trials too, at lp_ft's own learning rate.
            strategies = ("linear_probe", "lp_ft")
            if "learning_rate" not in pinned:
                lr = LP_FT_LEARNING_RATE
        wd = config.effective_weight_decay or WD_WHEN_ZERO
        size = config.input_size
        below = [s for s in IMAGE_SIZES if s < size][-3:]
        aug = config.augmentation
        presets = None if aug.ops is not None else tuple(dict.fromkeys((*PRESETS, aug.preset)))
        return cls(
            learning_rate=(lr / LR_SPREAD, min(1.0, lr * LR_SPREAD)),
            weight_decay=(wd / WD_SPREAD, min(1.0, wd * WD_SPREAD)),
            image_sizes=(*below, size),
            presets=presets,
            epochs=(max(1, math.ceil(config.epochs / 2)), min(500, 2 * config.epochs)),
            strategies=strategies,
        )

    def baseline(self, config: JobSpec) -> dict[str, Any]:
        """The config's own values as a point of this space (the first, enqueued trial)."""
        point: dict[str, Any] = {
            "learning_rate": config.learning_rate,
            "weight_decay": _clamp(config.effective_weight_decay, self.weight_decay),
            "image_size": config.input_size,
            "epochs": config.epochs,
        }
        if self.presets is not None:
            point["augmentation"] = config.augmentation.preset
        if self.strategies:
            point["strategy"] = config.strategy
        return point

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        params: dict[str, Any] = {
            "learning_rate": trial.suggest_float("learning_rate", *self.learning_rate, log=True),
            "weight_decay": trial.suggest_float("weight_decay", *self.weight_decay, log=True),
            "image_size": trial.suggest_categorical("image_size", self.image_sizes),
            "epochs": trial.suggest_int("epochs", *self.epochs),
        }
        if self.presets is not None:
            params["augmentation"] = trial.suggest_categorical("augmentation", self.presets)
        if self.strategies:
            params["strategy"] = trial.suggest_categorical("strategy", self.strategies)
        return params

    def describe(self) -> dict[str, Any]:
        return {
            "learning_rate": list(self.learning_rate),
            "weight_decay": list(self.weight_decay),
            "image_size": list(self.image_sizes),
            "augmentation": list(self.presets) if self.presets is not None else None,
            "epochs": list(self.epochs),
            **({"strategy": list(self.strategies)} if self.strategies else {}),
        }


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def trial_spec(config: JobSpec, params: dict[str, Any] | None, budget: float) -> JobSpec:
    """The spec one trial trains with: the config's training fields, `params` over them
    (None: the config as given), no search, `budget` seconds. Rebuilt by validation, so
    every derived field follows."""
    fields = {k: v for k, v in config.model_dump(mode="json").items() if k in JobSpec.model_fields}
    fields.update(search=None, recipe="manual", time_budget_seconds=max(MIN_FIT_SECONDS, budget))
    if params is not None:
        fields.update({k: v for k, v in params.items() if k != "augmentation"})
        if "augmentation" in params:
            fields["augmentation"] = {**fields["augmentation"], "preset": params["augmentation"]}
    return JobSpec.model_validate(fields)


def trial_params(spec: JobSpec) -> dict[str, Any]:
    """What a trial trained with, as the report lists it."""
    return {
        "learning_rate": spec.learning_rate,
        "weight_decay": spec.effective_weight_decay,
        "image_size": spec.input_size,
        "augmentation": spec.augmentation.preset,
        "epochs": spec.epochs,
        "strategy": spec.strategy,
    }

"""Every field of the job spec reaches training: a field the API accepts and stores but the
worker never reads would be a setting that silently does nothing.

The spec is wrapped in a proxy that records which fields `prepare` and `fit` read, by
attribute name. Derived values (`input_size`, `effective_weight_decay`, `spec`, ...) are
evaluated against the proxy, so they record the fields they are computed from; a dump
(`to_dict`, `model_dump`) runs on the real spec and counts as reading nothing, since it
reads every field and proves nothing.

The fields `JobConfig` adds around the spec (`dataset_id`, `max_duration_seconds`,
`dataset_sha256`) are not the spec's: `worker/tasks.py` consumes them (which dataset, the
job's time limit, the dataset check), outside training by design.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from pydantic import BaseModel

from core.jobspec import EarlyStopping, JobSpec
from worker.training.data import prepare
from worker.training.fit import fit


class RecordingSpec:
    """A read-only view of a pydantic model that records the names of the fields read."""

    def __init__(self, model: BaseModel, reads: set[str], prefix: str = ""):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        model: BaseModel = self._model
        if name in type(model).model_fields:
            self._reads.add(self._prefix + name)
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                return RecordingSpec(value, self._reads, f"{self._prefix}{name}.")
            return value
        attribute = inspect.getattr_static(type(model), name, None)
        if isinstance(attribute, property):
            return attribute.fget(self)  # type: ignore[misc]
        return getattr(model, name)  # methods: on the real model, recording nothing

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"training must not change the spec (set {name!r})")


def all_fields(model_class: type[BaseModel], prefix: str = "") -> set[str]:
    """The model's fields, and the fields of the models nested in it (`augmentation.preset`)."""
    names = set()
    for name, info in model_class.model_fields.items():
        names.add(prefix + name)
        nested = [
            t
            for t in (info.annotation, *getattr(info.annotation, "__args__", ()))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        for t in nested:
            names |= all_fields(t, f"{prefix}{name}.")
    return names


# Read by the worker around `fit`, not by `fit`: the auto recipe plans before it, the
# search calls it once per trial (tests/training/test_recipe.py, test_search.py), the export
# after it writes the int8 file (worker/delivery.py; tests/training/test_training.py), and
# `gpus` chooses `fit_distributed`, which runs `fit` in each rank (test_distributed.py).
AROUND_FIT = {"recipe", "search", "export_int8", "gpus"}

# What each strategy has no use for, and why. Every other field of the spec must be read.
NOT_USED_BY: dict[str, dict[str, str]] = {
    "lp_ft": {},
    "full": {"probe_epochs": "no probe"},
    "gradual": {"probe_epochs": "no probe"},
    "linear_probe": {
        "epochs": "one solve on cached features, no epochs",
        "learning_rate": "the probe is solved by L-BFGS, no learning rate",
        "optimizer": "the probe is solved by L-BFGS",
        "weight_decay": "the probe's penalty is chosen by cross-validation",
        "ema": "no steps to average",
        "layer_decay": "the backbone never trains",
        "schedule": "no steps, no schedule",
        "warmup_epochs": "no steps, no schedule",
        "backbone_lr_mult": "the backbone never trains",
        "freeze_norm_stats": "the backbone never trains",
        "grad_clip_norm": "the head's steps are not clipped",
        "compile": "the head alone is not worth compiling",
        "augmentation": "features are computed once, from un-augmented images",
    },
}


# `few_digits` (100 digits, ingested): tests/training/conftest.py


def fields_read(few_digits, **overrides: Any) -> set[str]:
    archive, index, cache = few_digits
    params: dict[str, Any] = dict(
        epochs=1,
        probe_epochs=1,
        image_size=32,
        batch_size=16,
        # Set, so that its own fields (metric, patience, min_delta) can be read too.
        early_stopping=EarlyStopping(patience=3),
    )
    params.update(overrides)
    reads: set[str] = set()
    spec: Any = RecordingSpec(JobSpec(**params), reads)
    fit(spec, prepare(archive, index, spec, cache), num_workers=0)
    return reads


def test_every_field_and_nested_field_of_the_spec_reaches_training(few_digits):
    """The default strategy (lp_ft) uses everything, down to the augmentation's and early
    stopping's own fields."""
    expected = {f for f in all_fields(JobSpec) if f.split(".")[0] not in AROUND_FIT}
    assert {"augmentation.preset", "early_stopping.min_delta"} <= expected  # the walk works
    unread = expected - fields_read(few_digits, strategy="lp_ft")
    assert not unread, f"JobSpec fields that never reach training: {sorted(unread)}"


@pytest.mark.parametrize("strategy", sorted(NOT_USED_BY))
def test_each_strategy_reads_every_field_it_has_a_use_for(few_digits, strategy):
    read = fields_read(few_digits, strategy=strategy)
    unread = set(JobSpec.model_fields) - read - AROUND_FIT
    expected = set(NOT_USED_BY[strategy])
    assert unread == expected, (
        f"{strategy}: never read: {sorted(unread - expected)}; "
        f"read although listed as unused: {sorted(expected - unread)}"
    )


def test_a_dump_of_the_spec_counts_as_no_read():
    reads: set[str] = set()
    spec: Any = RecordingSpec(JobSpec(), reads)
    spec.to_dict()
    spec.model_dump()
    assert reads == set()
    assert spec.input_size == 224 and reads == {"image_size"}  # a derived value: its source

"""A resume checkpoint describes itself and still loads as data only."""

from __future__ import annotations

import torch

from core.jobspec import Augmentation, JobSpec
from worker.training.callbacks import Callbacks
from worker.training.checkpoint import load_checkpoint
from worker.training.data import prepare
from worker.training.export import build_metadata
from worker.training.fit import fit


class Keep(Callbacks):
    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_checkpoint(self, state: dict) -> None:
        self.states.append(state)


def test_a_checkpoint_says_what_it_is_and_resumes_after_a_weights_only_load(few_digits, tmp_path):
    archive, index, cache = few_digits
    config = JobSpec(
        epochs=2,
        probe_epochs=2,
        image_size=32,
        batch_size=16,
        augmentation=Augmentation(hflip=False),
    )
    data = prepare(archive, index, config, cache)
    kept = Keep()
    straight = fit(config, data, kept, num_workers=0)
    assert [(s["phase"], s["epoch"]) for s in kept.states] == [
        ("probe", 0),
        ("fine_tune", 1),
        ("fine_tune", 2),
    ]

    torch.save(kept.states[1], tmp_path / "attempt-1.pt")
    state = load_checkpoint(tmp_path / "attempt-1.pt")  # weights_only=True, or refused
    metadata = build_metadata(config, data.classes, {}, {})
    assert state["version"] == 2
    assert state["backbone"] == "efficientnet_lite0" == metadata["backbone"]
    assert state["architecture"] == "tf_efficientnet_lite0"
    assert state["class_names"] == data.classes and state["num_classes"] == 10
    assert state["train_config"] == config.to_dict()
    assert state["preprocessing"] == {
        key: metadata[key]
        for key in ("input_size", "resize_size", "crop", "interpolation", "mean", "std", "color")
    }
    assert state["preprocessing"]["input_size"] == [3, 32, 32]
    assert state["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert set(state["library_versions"]) == {"python", "torch", "torchvision", "timm"}
    assert all(type(v) is str for v in state["library_versions"].values())

    resumed = fit(config, data, Keep(), num_workers=0, resume=state)
    assert resumed.extra["resumed_from"] == {"phase": "fine_tune", "epoch": 1}
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.history[-1]["val_accuracy"] == straight.history[-1]["val_accuracy"]

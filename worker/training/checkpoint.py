"""Resume checkpoints: what `fit` hands its callbacks each epoch, read back as data only.

A checkpoint describes itself (backbone, class names, the job spec, preprocessing, library
versions) beside the weights, optimizer, schedule and RNG states, so it can be understood
without the DB. It holds tensors, numbers, strings and plain containers only.

It comes back from the object store, so it is treated like anything a user could have placed
there: it is read with `torch.load(..., weights_only=True)` (never an arbitrary unpickle, so
no code runs), and anything that is not such a file, or not shaped like what `fit` wrote, is
refused with `CheckpointRefused`. The descriptive fields are not required: checkpoints
written before they existed still resume.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.jobspec import JobSpec
from worker.training.provenance import model_card, preprocessing

VERSION = 2  # 1: before the descriptive fields

# What `fit(..., resume=state)` reads unconditionally (see `build_checkpoint`).
REQUIRED_KEYS = (
    "phase",
    "epoch",
    "model",
    "history",
    "best_metrics",
    "best_state",
    "stale_epochs",
    "extra",
)
# And, to go on fine-tuning (`_fine_tune`), the optimizer, schedule and RNG states.
FINE_TUNE_KEYS = ("optimizer", "scheduler", "loader_rng", "torch_rng", "planned")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointRefused(ValueError):
    """The file is not a weights-only resume checkpoint; nothing in it was executed."""


def load_error_reason(exc: BaseException) -> str:
    """A one-line reason for a failed weights-only load, e.g. `UnpicklingError: Unsupported
    global: GLOBAL posix.system ...`. torch's full message advises retrying as a full
    unpickle, which is exactly what must never be done with such a file."""
    text = _ANSI.sub("", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first_sentence = re.split(r"(?<=\.)\s", lines[0], maxsplit=1)[0]
    return f"{type(exc).__name__}: {first_sentence}"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a resume checkpoint written by `torch.save(state)`, refusing anything else."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError:
        raise  # the file itself could not be read: not a verdict on its contents
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointRefused(
            f"{path} is not a valid weights-only checkpoint and was refused "
            f"({load_error_reason(exc)})"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointRefused(
            f"{path} is not a valid weights-only checkpoint and was refused "
            f"(it holds a {type(obj).__name__}, not a dict)"
        )
    required = REQUIRED_KEYS + (FINE_TUNE_KEYS if obj.get("phase") == "fine_tune" else ())
    missing = [key for key in required if key not in obj]
    if missing:
        raise CheckpointRefused(
            f"{path} is not a valid weights-only checkpoint and was refused "
            f"(missing {', '.join(missing)})"
        )
    return obj


def cpu_copy(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples in which every tensor is a CPU copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.copy(obj)


def build_checkpoint(
    config: JobSpec,
    classes: list[str],
    model: nn.Module,
    record: dict[str, Any],
    extra: dict[str, Any],
    phase: str,
    epoch: int,
    training: dict[str, Any],
) -> dict[str, Any]:
    """A resumable, self-describing snapshot. `record`: the history and best epoch (see
    `EpochRecord.snapshot`); `training`: the fine-tuning phase's optimizer, schedule and
    loader states."""
    state: dict[str, Any] = {
        "version": VERSION,
        **model_card(config, classes),
        "preprocessing": preprocessing(config),
        "phase": phase,
        "epoch": epoch,
        "model": cpu_copy(model.state_dict()),
        **record,
        "extra": {k: v for k, v in extra.items() if k != "resumed_from"},
        "torch_rng": torch.get_rng_state(),
    }
    # A snapshot: optimizer state_dicts hold the live tensors, which the next step mutates;
    # copied straight to the CPU (a deepcopy would first clone them on the GPU).
    state.update(cpu_copy(training))
    return state


def resumed_from(state: dict[str, Any]) -> dict[str, Any]:
    """Where a resumed run picks up, as recorded with the job."""
    where: dict[str, Any] = {"phase": state["phase"], "epoch": int(state["epoch"])}
    if state.get("partial"):
        where["step"] = int(state["partial"]["steps"])
    return where

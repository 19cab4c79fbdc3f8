"""Reading a resume checkpoint back, as data only.

A checkpoint comes from the object store, so it is treated like anything a user could have
placed there: it is read with `torch.load(..., weights_only=True)` (tensors, numbers,
strings and plain containers; never an arbitrary unpickle, so no code runs), and anything
that is not such a file, or not shaped like what `fit` wrote, is refused with
`CheckpointRefused`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

# What `fit(..., resume=state)` reads unconditionally (see `_Run.checkpoint`).
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

"""A CSV (header row) or JSONL manifest: one row per image, its path, label and split."""

from __future__ import annotations

import csv
import io
import json

from service.errors import ErrorCode, ServiceError
from service.ingest.layout import SPLIT_NAMES

MANIFEST_SUFFIXES = {".csv", ".jsonl"}
PATH_COLUMNS = ("path", "file", "filename", "image")
LABEL_COLUMNS = ("label", "class", "category")
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


def parse_manifest(name: str, data: bytes) -> dict[str, tuple[str, str | None]]:
    """path -> (label, split) from a CSV (header row) or JSONL manifest."""
    text = data.decode("utf-8-sig", errors="replace")
    if name.lower().endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ServiceError(
                        ErrorCode.DATASET_LAYOUT, f"manifest {name} line {n} is not JSON: {exc}"
                    ) from exc
    else:
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as exc:
            raise ServiceError(
                ErrorCode.DATASET_LAYOUT, f"manifest {name} is not valid CSV: {exc}"
            ) from exc
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ServiceError(
            ErrorCode.DATASET_LAYOUT, f"manifest {name} has no rows of named columns"
        )
    keys = {k.strip().lower(): k for k in rows[0] if k}
    path_key = next((keys[k] for k in PATH_COLUMNS if k in keys), None)
    label_key = next((keys[k] for k in LABEL_COLUMNS if k in keys), None)
    if path_key is None or label_key is None:
        raise ServiceError(
            ErrorCode.DATASET_LAYOUT,
            f"manifest {name} needs a path column ({'/'.join(PATH_COLUMNS)}) and a label column "
            f"({'/'.join(LABEL_COLUMNS)}); found columns {sorted(keys)}",
        )
    split_key = keys.get("split")
    out: dict[str, tuple[str, str | None]] = {}
    for n, row in enumerate(rows, start=2):
        path, label = str(row.get(path_key) or "").strip(), str(row.get(label_key) or "").strip()
        if not path or not label:
            raise ServiceError(
                ErrorCode.DATASET_LAYOUT, f"manifest {name} row {n}: empty path or label"
            )
        split = None
        if split_key and str(row.get(split_key) or "").strip():
            raw = str(row[split_key]).strip().lower()
            if raw not in SPLIT_NAMES:
                raise ServiceError(
                    ErrorCode.DATASET_LAYOUT,
                    f"manifest {name} row {n}: split {raw!r} is not one of {sorted(SPLIT_NAMES)}",
                )
            split = SPLIT_NAMES[raw]
        out[path.lstrip("./")] = (label, split)
    return out

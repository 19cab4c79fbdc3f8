"""A CSV or JSONL manifest read as a stream, with caps: at most `MAX_MANIFEST_BYTES` of
text, at most `limits.max_entries` rows (a manifest cannot usefully list more files than an
archive may hold), and, for a zip member, no more than `max_compression_ratio` times its
compressed size. Rows are checked one at a time; only the path -> (label, split) map is kept,
its labels and places shared, so memory follows the rows, not the text."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from service.errors import ErrorCode, ServiceError
from service.ingest.layout import SPLIT_NAMES
from service.ingest.manifest import LABEL_COLUMNS, PATH_COLUMNS
from service.ingest.model import Limits
from service.ingest.sources import RawEntry

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
RATIO_FLOOR = 1024 * 1024  # below this a manifest's compression ratio does not matter

Row = tuple[str, str, str | None]  # path (relative to the manifest), label, split


class _Capped(io.RawIOBase):
    """At most `cap` bytes of `inner`; 413 past them (whatever the header declared)."""

    def __init__(self, inner: BinaryIO, cap: int, name: str):
        self._inner, self._left, self._name = inner, cap, name

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(min(len(b), self._left + 1))
        if len(data) > self._left:
            raise _too_big(self._name)
        self._left -= len(data)
        b[: len(data)] = data
        return len(data)


def _too_big(name: str) -> ServiceError:
    return ServiceError(
        ErrorCode.DATASET_LIMIT,
        f"manifest {name} is larger than {MAX_MANIFEST_BYTES // 2**20} MiB; list only the images",
    )


def _layout_error(detail: str) -> ServiceError:
    return ServiceError(ErrorCode.DATASET_LAYOUT, detail)


def _jsonl(text: io.TextIOBase, name: str) -> Iterator[Any]:
    for n, line in enumerate(text, start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except (ValueError, RecursionError) as exc:  # deep nesting, 5,000-digit numbers
                raise _layout_error(f"manifest {name} line {n} is not JSON: {exc}") from exc


def _csv(text: io.TextIOBase, name: str) -> Iterator[Any]:
    try:
        yield from csv.DictReader(text)
    except csv.Error as exc:
        raise _layout_error(f"manifest {name} is not valid CSV: {exc}") from exc


def _text(value: Any, name: str, n: int) -> str:
    """A cell as text that a JSON column can store: no NUL, no lone surrogate."""
    out = str(value or "").strip()
    if "\0" in out or (not out.isascii() and _unencodable(out)):
        raise _layout_error(f"manifest {name} row {n}: a NUL byte or invalid text in {out[:40]!r}")
    return out


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_manifest_rows(fileobj: BinaryIO, name: str, limits: Limits) -> Iterator[Row]:
    """(path, label, split) per row of the manifest `name` read from `fileobj`."""
    text = io.TextIOWrapper(
        io.BufferedReader(_Capped(fileobj, MAX_MANIFEST_BYTES, name)),
        encoding="utf-8-sig",
        errors="replace",
        newline="",
    )
    rows = _jsonl(text, name) if name.lower().endswith(".jsonl") else _csv(text, name)
    first = next(rows, None)
    if not isinstance(first, dict):
        raise _layout_error(f"manifest {name} has no rows of named columns")
    keys = {str(k).strip().lower(): k for k in first if k}
    path_key = next((keys[k] for k in PATH_COLUMNS if k in keys), None)
    label_key = next((keys[k] for k in LABEL_COLUMNS if k in keys), None)
    if path_key is None or label_key is None:
        raise _layout_error(
            f"manifest {name} needs a path column ({'/'.join(PATH_COLUMNS)}) and a label column "
            f"({'/'.join(LABEL_COLUMNS)}); found columns {sorted(keys)}"
        )
    split_key = keys.get("split")
    for n, row in enumerate(itertools.chain([first], rows), start=2):
        if n - 1 > limits.max_entries:
            raise ServiceError(
                ErrorCode.DATASET_LIMIT,
                f"manifest {name} has more than {limits.max_entries} rows (MAX_ARCHIVE_ENTRIES)",
            )
        if not isinstance(row, dict):
            raise _layout_error(f"manifest {name} has no rows of named columns")
        path, label = _text(row.get(path_key), name, n), _text(row.get(label_key), name, n)
        if not path or not label:
            raise _layout_error(f"manifest {name} row {n}: empty path or label")
        split = None
        raw = _text(row.get(split_key), name, n).lower() if split_key else ""
        if raw:
            if raw not in SPLIT_NAMES:
                raise _layout_error(
                    f"manifest {name} row {n}: split {raw!r} is not one of {sorted(SPLIT_NAMES)}"
                )
            split = SPLIT_NAMES[raw]
        yield path.lstrip("./"), label, split


def read_manifest(entry: RawEntry, limits: Limits) -> dict[str, tuple[str, str | None]]:
    """path -> (label, split) for the manifest `entry`, refused (413) before it is read when
    its declared size or compression ratio is over the caps."""
    if entry.size > MAX_MANIFEST_BYTES:
        raise _too_big(entry.name)
    ratio = entry.size / entry.compressed_size if entry.compressed_size else 0.0
    if entry.size > RATIO_FLOOR and ratio > limits.max_compression_ratio:
        raise ServiceError(
            ErrorCode.DATASET_LIMIT,
            f"manifest {entry.name} expands {ratio:.0f}x, more than "
            f"{limits.max_compression_ratio:g}x (MAX_COMPRESSION_RATIO)",
        )
    out: dict[str, tuple[str, str | None]] = {}
    places: dict[tuple[str, str | None], tuple[str, str | None]] = {}
    try:
        with entry.opener() as f:
            for path, label, split in read_manifest_rows(f, entry.name, limits):
                out[path] = places.setdefault((label, split), (label, split))
    except OSError as exc:
        raise _layout_error(f"manifest {entry.name} cannot be read: {exc}") from exc
    return out

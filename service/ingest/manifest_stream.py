"""A CSV or JSONL manifest read as a stream, with caps: at most `MAX_MANIFEST_BYTES` of
text, at most `limits.max_entries` rows (a manifest cannot usefully list more files than an
archive may hold), and, for a zip member, no more than `max_compression_ratio` times its
compressed size. Rows are checked one at a time; only the path -> (label, split) map is kept,
its labels and places shared, so memory follows the rows, not the text.

A `labels` column instead of `label` makes a multi-label manifest: each row's class names
(`a|b` in a CSV, `["a", "b"]` in a JSONL) become a sorted tuple; at most
`MAX_LABELS_PER_IMAGE` per row and `MAX_MULTILABEL_CLASSES` distinct names in all, so the
names kept stay bounded too."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from service.errors import ErrorCode, ServiceError
from service.ingest.layout import SPLIT_NAMES
from service.ingest.manifest import (
    LABEL_COLUMNS,
    LABEL_SEPARATOR,
    LABELS_COLUMN,
    MAX_LABELS_PER_IMAGE,
    MAX_MULTILABEL_CLASSES,
    PATH_COLUMNS,
    Labels,
)
from service.ingest.model import Limits
from service.ingest.sources import RawEntry

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
RATIO_FLOOR = 1024 * 1024  # below this a manifest's compression ratio does not matter

Row = tuple[str, Labels, str | None]  # path (relative to the manifest), label(s), split


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


def _jsonl(text: io.TextIOBase, name: str) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(text, start=1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except (ValueError, RecursionError) as exc:  # deep nesting, 5,000-digit numbers
                raise _layout_error(f"manifest {name} line {n} is not JSON: {exc}") from exc


def _csv(text: io.TextIOBase, name: str) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(text)
    try:
        for row in reader:
            yield reader.line_num, row  # the row's last line: a quoted cell may span lines
    except csv.Error as exc:
        raise _layout_error(f"manifest {name} is not valid CSV: {exc}") from exc


def _text(value: Any, where: str) -> str:
    """A cell as text that a JSON column can store: no NUL, no lone surrogate."""
    out = str(value or "").strip()
    if "\0" in out or (not out.isascii() and _unencodable(out)):
        raise _layout_error(f"{where}: a NUL byte or invalid text in {out[:40]!r}")
    return out


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _labels(value: Any, where: str, jsonl: bool) -> tuple[str, ...]:
    """A multi-label row's class names, sorted; refused (naming the row) unless it holds
    1 to MAX_LABELS_PER_IMAGE distinct, non-empty names."""
    accepted = (
        'a JSON list of class names, e.g. "labels": ["cat", "outdoor"]'
        if jsonl
        else f"class names separated by {LABEL_SEPARATOR!r}, e.g. cat{LABEL_SEPARATOR}outdoor"
    )
    if jsonl:
        if not isinstance(value, list):
            raise _layout_error(
                f"{where}: labels is {json.dumps(value)[:40]}, not a list; expected {accepted}"
            )
        for item in value[: MAX_LABELS_PER_IMAGE + 1]:
            if not isinstance(item, str):
                raise _layout_error(
                    f"{where}: labels holds {json.dumps(item)[:40]}, not a string; "
                    f"expected {accepted}"
                )
        items: list[str] = value
    else:
        cell = value if isinstance(value, str) else ""
        items = cell.split(LABEL_SEPARATOR) if cell.strip() else []
    if not items:
        raise _layout_error(f"{where}: no labels; expected {accepted}")
    if len(items) > MAX_LABELS_PER_IMAGE:
        raise _layout_error(
            f"{where}: {len(items)} labels, more than {MAX_LABELS_PER_IMAGE} for one image"
        )
    names = [_text(v, where) for v in items]
    if "" in names:
        raise _layout_error(f"{where}: an empty label in {str(value)[:60]!r}; expected {accepted}")
    if len(set(names)) < len(names):
        twice = next(x for i, x in enumerate(names) if x in names[:i])
        raise _layout_error(f"{where}: label {twice[:40]!r} is listed more than once")
    return tuple(sorted(names))


def _columns(first: dict[Any, Any], name: str) -> tuple[Any, Any, Any, Any]:
    """The path, label, labels and split keys of the first row: one of label and labels."""
    keys = {str(k).strip().lower(): k for k in first if k}
    path_key = next((keys[k] for k in PATH_COLUMNS if k in keys), None)
    label_key = next((keys[k] for k in LABEL_COLUMNS if k in keys), None)
    labels_key = keys.get(LABELS_COLUMN)
    if label_key is not None and labels_key is not None:
        raise _layout_error(
            f"manifest {name} has both a {str(label_key)!r} and a {LABELS_COLUMN!r} column; "
            f"keep {str(label_key)!r} for one class per image or {LABELS_COLUMN!r} for several"
        )
    if path_key is None or (label_key is None and labels_key is None):
        raise _layout_error(
            f"manifest {name} needs a path column ({'/'.join(PATH_COLUMNS)}) and a label column "
            f"({'/'.join(LABEL_COLUMNS)}), or a {LABELS_COLUMN!r} column for several classes "
            f"per image; found columns {sorted(keys)}"
        )
    return path_key, label_key, labels_key, keys.get("split")


def read_manifest_rows(fileobj: BinaryIO, name: str, limits: Limits) -> Iterator[Row]:
    """(path, label, split) per row of the manifest `name` read from `fileobj`; in a
    multi-label manifest the label is the row's sorted tuple of class names."""
    text = io.TextIOWrapper(
        io.BufferedReader(_Capped(fileobj, MAX_MANIFEST_BYTES, name)),
        encoding="utf-8-sig",
        errors="replace",
        newline="",
    )
    jsonl = name.lower().endswith(".jsonl")
    rows = _jsonl(text, name) if jsonl else _csv(text, name)
    first = next(rows, None)
    if first is None or not isinstance(first[1], dict):
        raise _layout_error(f"manifest {name} has no rows of named columns")
    path_key, label_key, labels_key, split_key = _columns(first[1], name)
    # A JSONL row names its own keys: one may not bring the other kind of label column.
    other = {LABELS_COLUMN} if labels_key is None else set(LABEL_COLUMNS)
    names: dict[str, str] = {}  # each class name kept once, however many rows carry it
    for count, (n, row) in enumerate(itertools.chain([first], rows), start=1):
        if count > limits.max_entries:
            raise ServiceError(
                ErrorCode.DATASET_LIMIT,
                f"manifest {name} has more than {limits.max_entries} rows (MAX_ARCHIVE_ENTRIES)",
            )
        if not isinstance(row, dict):
            raise _layout_error(f"manifest {name} has no rows of named columns")
        where = f"manifest {name} line {n}"
        if jsonl and any(str(k).strip().lower() in other for k in row):
            raise _layout_error(
                f"{where}: has both a label and a {LABELS_COLUMN!r} key; use one kind per manifest"
            )
        path = _text(row.get(path_key), where)
        label: Labels
        if labels_key is not None:
            label = tuple(
                names.setdefault(x, x) for x in _labels(row.get(labels_key), where, jsonl)
            )
            if len(names) > MAX_MULTILABEL_CLASSES:
                raise ServiceError(
                    ErrorCode.DATASET_LIMIT,
                    f"{where}: more than {MAX_MULTILABEL_CLASSES} classes in a multi-label "
                    "manifest",
                )
        else:
            label = _text(row.get(label_key), where)
        if not path or not label:
            raise _layout_error(f"{where}: empty path or label")
        split = None
        raw = _text(row.get(split_key), where).lower() if split_key else ""
        if raw:
            if raw not in SPLIT_NAMES:
                raise _layout_error(f"{where}: split {raw!r} is not one of {sorted(SPLIT_NAMES)}")
            split = SPLIT_NAMES[raw]
        yield path.lstrip("./"), label, split


def read_manifest(entry: RawEntry, limits: Limits) -> dict[str, tuple[Labels, str | None]]:
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
    out: dict[str, tuple[Labels, str | None]] = {}
    places: dict[tuple[Labels, str | None], tuple[Labels, str | None]] = {}
    try:
        with entry.opener() as f:
            for path, label, split in read_manifest_rows(f, entry.name, limits):
                out[path] = places.setdefault((label, split), (label, split))
    except OSError as exc:
        raise _layout_error(f"manifest {entry.name} cannot be read: {exc}") from exc
    return out

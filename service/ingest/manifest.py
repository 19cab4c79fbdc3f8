"""A CSV (header row) or JSONL manifest: one row per image, its path, label and split.
Read as a stream, with caps, by `manifest_stream.py`."""

from __future__ import annotations

MANIFEST_SUFFIXES = {".csv", ".jsonl"}
PATH_COLUMNS = ("path", "file", "filename", "image")
LABEL_COLUMNS = ("label", "class", "category")

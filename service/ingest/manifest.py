"""A CSV (header row) or JSONL manifest: one row per image, its path, label(s) and split.
Read as a stream, with caps, by `manifest_stream.py`.

One class per image: a `label` column (or `class`, `category`). Several classes per image
(a multi-label dataset): a `labels` column instead, its names separated by `|` in a CSV
(`cat|outdoor`) or a JSON list of strings in a JSONL (`["cat", "outdoor"]`)."""

from __future__ import annotations

MANIFEST_SUFFIXES = {".csv", ".jsonl"}
PATH_COLUMNS = ("path", "file", "filename", "image")
LABEL_COLUMNS = ("label", "class", "category")
LABELS_COLUMN = "labels"
LABEL_SEPARATOR = "|"
MAX_LABELS_PER_IMAGE = 64
# A multi-label head scores every class for every image: past this many classes the
# multi-hot targets (images x classes) stop being small.
MAX_MULTILABEL_CLASSES = 1000

SINGLE_LABEL = "single-label"
MULTI_LABEL = "multi-label"

# An image's class: one name, or (multi-label) the sorted tuple of its class names.
Labels = str | tuple[str, ...]

"""What an ingest is allowed (`Limits`) and what it found (`IngestReport`)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from core.settings import Settings
from service.ingest.manifest import MULTI_LABEL, SINGLE_LABEL

MAX_LISTED = 50  # rejected/skipped entries echoed back in one response
MAX_STORED = 1000  # rejected/skipped entries kept on the dataset row


@dataclass
class Limits:
    max_pixels: int = 40_000_000
    min_per_class: int = 2
    max_entries: int = 1_000_000
    max_total_bytes: int = 64 * 1024**3
    max_entry_bytes: int = 256 * 1024**2
    max_compression_ratio: float = 200.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_pixels=settings.max_image_pixels,
            min_per_class=settings.min_images_per_class,
            max_entries=settings.max_archive_entries,
            max_total_bytes=settings.max_dataset_bytes,
            max_compression_ratio=settings.max_compression_ratio,
        )


@dataclass
class IngestReport:
    classes: list[str]
    # path (in the canonical zip), source, label, split, w, h, ...; a multi-label entry also
    # has `labels` (sorted class indices) and its `label` is the first of them.
    entries: list[dict[str, Any]]
    rejected: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    layout: str = "imagefolder"
    format: str = "zip"
    details: dict[str, Any] = field(default_factory=dict)
    task: str = SINGLE_LABEL  # or MULTI_LABEL: several classes per image, from a manifest

    @property
    def class_counts(self) -> dict[str, int]:
        """Images per class; a multi-label image counts once for each of its classes."""
        counts = Counter(i for e in self.entries for i in e.get("labels", (e["label"],)))
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    @property
    def splits(self) -> list[str]:
        return sorted({e["split"] for e in self.entries if e["split"]})

    def index(self) -> dict[str, Any]:
        """The JSON document stored beside the images; the worker trains from it. An index
        without `task` (written before multi-label datasets) is single-label."""
        return {
            "version": 2,
            "format": "zip",
            "layout": self.layout,
            "task": self.task,
            "classes": self.classes,
            "entries": self.entries,
        }

    def content_hash(self) -> str:
        """Identifies the dataset by what it holds (images, labels, splits), not by how it
        was packed: the same images zipped twice hash the same."""
        digest = hashlib.sha256()
        rows = sorted(
            (e["source"], self._names(e), e["split"] or "", e["sha256"]) for e in self.entries
        )
        digest.update(json.dumps(rows).encode())
        return digest.hexdigest()

    def _names(self, entry: dict[str, Any]) -> str | list[str]:
        # Single-label: the class name alone, so those datasets hash as they always have.
        if self.task == MULTI_LABEL:
            return [self.classes[i] for i in entry["labels"]]
        return str(self.classes[entry["label"]])

    def summary(self) -> dict[str, Any]:
        """What the dataset row keeps of the report (the responses read it back)."""
        return {
            "format": self.format,
            "layout": self.layout,
            "task": self.task,
            "rejected": self.rejected[:MAX_STORED],
            "skipped": self.skipped[:MAX_STORED],
            "num_rejected": len(self.rejected),
            "num_skipped": len(self.skipped),
            "details": self.details,
        }

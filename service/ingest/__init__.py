"""Turn an uploaded archive into a validated, immutable dataset.

Two streaming passes over the archive, one entry in memory at a time:
1. list: names, kinds and sizes; unsafe, hidden and non-image entries sorted out; the
   layout found (ImageFolder, train/val/test folders, or a CSV/JSONL manifest);
2. read: every image fully decoded once (only the decoders we accept), fingerprinted
   (SHA-256, dHash) and copied byte for byte into a canonical, uncompressed zip that the
   workers train from. Caps on entry count, total bytes and compression ratio are checked
   before each entry's bytes are written.
Nothing here touches the object store or the database: the route stores the result only
after the whole archive has been checked.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from service.errors import ErrorCode, ServiceError
from service.ingest.images import IMAGE_EXTENSIONS, PIL_FORMATS, inspect_image
from service.ingest.report import build_report
from service.ingest.sources import Archive, EntryTooLarge, RawEntry, S3Prefix

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "PIL_FORMATS",
    "IngestReport",
    "Limits",
    "ingest_archive",
    "ingest_s3_prefix",
]

SYSTEM_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
MANIFEST_SUFFIXES = {".csv", ".jsonl"}
PATH_COLUMNS = ("path", "file", "filename", "image")
LABEL_COLUMNS = ("label", "class", "category")
MAX_LISTED = 50  # rejected/skipped entries echoed back in one response
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


@dataclass
class Limits:
    max_pixels: int = 40_000_000
    min_per_class: int = 2
    max_entries: int = 1_000_000
    max_total_bytes: int = 64 * 1024**3
    max_entry_bytes: int = 256 * 1024**2
    max_compression_ratio: float = 200.0


@dataclass
class IngestReport:
    classes: list[str]
    entries: list[dict[str, Any]]  # path (in the canonical zip), source, label, split, w, h, ...
    rejected: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    layout: str = "imagefolder"
    format: str = "zip"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def class_counts(self) -> dict[str, int]:
        counts = Counter(e["label"] for e in self.entries)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    @property
    def splits(self) -> list[str]:
        return sorted({e["split"] for e in self.entries if e["split"]})

    def index(self) -> dict[str, Any]:
        """The JSON document stored beside the images; the worker trains from it."""
        return {
            "version": 2,
            "format": "zip",
            "layout": self.layout,
            "classes": self.classes,
            "entries": self.entries,
        }


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p in SYSTEM_NAMES for p in parts)


def _unsafe_reason(entry: RawEntry) -> str | None:
    name = entry.name
    if "\\" in name:
        return "path contains a backslash"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if any(p == ".." for p in name.split("/")):
        return "path escapes the archive ('..')"
    if entry.kind == "link":
        return "symbolic or hard link"
    if entry.kind == "device":
        return "not a regular file (device, fifo or socket)"
    return None


def _common_top(names: list[str]) -> str | None:
    """A single folder wrapping the whole tree (`digits/0/a.png`) is not a class."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all(n.count("/") >= 2 for n in names):
        return tops.pop()
    return None


def _parse_manifest(name: str, data: bytes) -> dict[str, tuple[str, str | None]]:
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


class _Layout:
    """Where an image's class and split come from."""

    def __init__(
        self, image_names: list[str], manifest: tuple[str, dict[str, tuple[str, str | None]]] | None
    ):
        self.top = _common_top(image_names) if image_names else None
        # Keyed by full archive path: manifest paths are relative to the manifest's folder.
        self.manifest = (
            {
                PurePosixPath(PurePosixPath(manifest[0]).parent, p).as_posix(): place
                for p, place in manifest[1].items()
            }
            if manifest
            else None
        )
        rel = [self.relative(n) for n in image_names]
        firsts = {r.split("/", 1)[0].lower() for r in rel if "/" in r}
        if self.manifest is not None:
            self.kind = "manifest"
        elif firsts and firsts <= set(SPLIT_NAMES) and "train" in firsts:
            self.kind = "splits"
        else:
            self.kind = "imagefolder"

    def relative(self, name: str) -> str:
        return name[len(self.top) + 1 :] if self.top and name.startswith(self.top + "/") else name

    def locate(self, name: str) -> tuple[str, str | None] | str:
        """(class, split), or the reason the image has no place."""
        if self.manifest is not None:
            found = self.manifest.get(name)
            return found if found else "not listed in the manifest"
        rel = self.relative(name)
        parts = rel.split("/")
        if self.kind == "splits":
            if len(parts) < 3:
                return "image is not inside a class folder of its split"
            return parts[1], SPLIT_NAMES[parts[0].lower()]
        if len(parts) < 2:
            return "image is not inside a class folder"
        return parts[0], None


def ingest_archive(src: BinaryIO, out_zip: Path, limits: Limits) -> IngestReport:
    """An uploaded zip or tar (any compression tarfile reads), as a file object on disk."""
    archive = Archive(src)
    try:
        return _ingest(archive, out_zip, limits)
    finally:
        archive.close()


def ingest_s3_prefix(client: Any, uri: str, out_zip: Path, limits: Limits) -> IngestReport:
    """Objects already in the object store, laid out like an archive under `uri`."""
    return _ingest(S3Prefix(client, uri), out_zip, limits)


def _ingest(archive: Archive | S3Prefix, out_zip: Path, limits: Limits) -> IngestReport:
    rejected: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    images: list[str] = []
    manifests: list[tuple[str, bytes]] = []

    # Pass 1: list.
    count = 0
    for entry in archive.entries():
        count += 1
        if count > limits.max_entries:
            raise ServiceError(
                ErrorCode.DATASET_LIMIT,
                f"the archive has more than {limits.max_entries} entries (MAX_ARCHIVE_ENTRIES)",
            )
        if entry.kind == "dir":
            continue
        reason = _unsafe_reason(entry)
        if reason:
            rejected.append({"path": entry.name, "reason": reason})
            continue
        parts = PurePosixPath(entry.name).parts
        if _is_hidden(parts):
            continue  # .DS_Store, __MACOSX/, .ipynb_checkpoints/ ...: silently ignored
        suffix = PurePosixPath(entry.name).suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            images.append(entry.name)
        elif suffix in MANIFEST_SUFFIXES and len(parts) <= 2:
            try:
                manifests.append((entry.name, entry.read(MAX_MANIFEST_BYTES)))
            except EntryTooLarge:
                rejected.append({"path": entry.name, "reason": "manifest larger than 256 MiB"})
        else:
            skipped.append({"path": entry.name, "reason": "not an image file (by extension)"})

    if not images and not rejected:
        raise ServiceError(
            ErrorCode.DATASET_EMPTY,
            "the archive contains no image files; expected class folders with images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))})",
            {"skipped": skipped[:MAX_LISTED]},
        )
    if len(manifests) > 1:
        raise ServiceError(
            ErrorCode.DATASET_LAYOUT,
            f"found {len(manifests)} manifests ({', '.join(n for n, _ in manifests)}); keep one",
        )
    manifest = (manifests[0][0], _parse_manifest(*manifests[0])) if manifests else None
    layout = _Layout(images, manifest)
    wanted = set(images)

    # Pass 2: read, decode, fingerprint, copy.
    accepted: list[dict[str, Any]] = []
    class_of: list[str] = []
    total = 0
    archive_size = archive.size
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out_zip, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as out:
        for entry in archive.entries():
            if entry.name not in wanted:
                continue
            wanted.discard(entry.name)  # a duplicate name in one archive is read once
            place = layout.locate(entry.name)
            if isinstance(place, str):
                (skipped if layout.kind == "manifest" else rejected).append(
                    {"path": entry.name, "reason": place}
                )
                continue
            if (
                entry.compressed_size
                and entry.size / entry.compressed_size > limits.max_compression_ratio
            ):
                rejected.append(
                    {
                        "path": entry.name,
                        "reason": f"compression ratio over {limits.max_compression_ratio:g} "
                        "(MAX_COMPRESSION_RATIO): a decompression bomb?",
                    }
                )
                continue
            room = min(limits.max_entry_bytes, limits.max_total_bytes - total)
            try:
                data = entry.read(room)
            except EntryTooLarge:
                if room < limits.max_entry_bytes:
                    raise ServiceError(
                        ErrorCode.DATASET_LIMIT,
                        f"the archive expands past {limits.max_total_bytes} bytes "
                        "(MAX_DATASET_BYTES)",
                    ) from None
                rejected.append(
                    {
                        "path": entry.name,
                        "reason": f"entry larger than {limits.max_entry_bytes} bytes",
                    }
                )
                continue
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                rejected.append({"path": entry.name, "reason": f"cannot extract: {exc}"})
                continue
            total += len(data)
            if total / max(1, archive_size) > limits.max_compression_ratio:
                raise ServiceError(
                    ErrorCode.DATASET_LIMIT,
                    f"the archive expands more than {limits.max_compression_ratio:g}x its size "
                    "(MAX_COMPRESSION_RATIO): refused as a decompression bomb",
                )
            try:
                info = inspect_image(data, limits.max_pixels)
            except ValueError as exc:
                rejected.append({"path": entry.name, "reason": str(exc)})
                continue
            cls, split = place
            member = f"images/{len(accepted):07d}{PurePosixPath(entry.name).suffix.lower()}"
            out.writestr(member, data)
            accepted.append(
                {
                    "path": member,
                    "source": entry.name,
                    "split": split,
                    "w": info.width,
                    "h": info.height,
                    "format": info.format,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "dhash": info.dhash,
                }
            )
            class_of.append(cls)
    if layout.kind == "manifest" and layout.manifest is not None:
        listed = set(layout.manifest)
        present = {a["source"] for a in accepted} | {r["path"] for r in rejected}
        for missing in sorted(listed - present - {s["path"] for s in skipped})[:MAX_LISTED]:
            rejected.append(
                {"path": missing, "reason": "listed in the manifest but not in the archive"}
            )

    return _finish(accepted, class_of, rejected, skipped, layout.kind, archive.format, limits)


def _finish(
    accepted: list[dict[str, Any]],
    class_of: list[str],
    rejected: list[dict[str, str]],
    skipped: list[dict[str, str]],
    layout: str,
    fmt: str,
    limits: Limits,
) -> IngestReport:
    extra = {"rejected": rejected[:MAX_LISTED], "skipped": skipped[:MAX_LISTED]}
    if not accepted:
        first = rejected[0] if rejected else {"path": "-", "reason": "no images"}
        raise ServiceError(
            ErrorCode.DATASET_NO_VALID_IMAGES,
            f"no usable images: all {len(rejected)} image entries were rejected "
            f"(first: {first['path']}: {first['reason']})",
            extra,
        )
    classes = sorted(set(class_of))
    if len(classes) < 2:
        raise ServiceError(
            ErrorCode.DATASET_TOO_FEW_CLASSES,
            f"found only one class ({classes[0]!r}); a classifier needs at least 2 classes, "
            "each a folder (or a manifest label) holding that class's images",
            extra,
        )
    label = {c: i for i, c in enumerate(classes)}
    for entry, cls in zip(accepted, class_of, strict=True):
        entry["label"] = label[cls]
    # With given splits, the training split is what must be large enough.
    has_train = any(e["split"] == "train" for e in accepted)
    counted = Counter(
        class_of[i] for i, e in enumerate(accepted) if not has_train or e["split"] == "train"
    )
    small = {c: counted.get(c, 0) for c in classes if counted.get(c, 0) < limits.min_per_class}
    if small:
        where = " in the train split" if has_train else ""
        listed = ", ".join(f"{c!r} has {n}" for c, n in sorted(small.items()))
        raise ServiceError(
            ErrorCode.DATASET_CLASS_TOO_SMALL,
            f"every class needs at least {limits.min_per_class} usable images{where}: {listed}",
            extra,
        )
    details = build_report(accepted, classes)
    log.info(
        "ingested %d images in %d classes (%s, %s; %d rejected, %d skipped)",
        len(accepted),
        len(classes),
        fmt,
        layout,
        len(rejected),
        len(skipped),
    )
    return IngestReport(classes, accepted, rejected, skipped, layout, fmt, details)

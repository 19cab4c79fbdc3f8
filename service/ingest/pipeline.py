"""The two passes of an ingest, over an uploaded archive or the objects under an S3 prefix.

1. list: names, kinds and sizes; unsafe, hidden and non-image entries sorted out; the
   layout found (ImageFolder, train/val/test folders, or a CSV/JSONL manifest);
2. read: every image fully decoded once (only the decoders we accept), fingerprinted
   (SHA-256, dHash) and copied byte for byte into a canonical, uncompressed zip that the
   workers train from. Caps on entry count, total bytes and compression ratio are checked
   before each entry's bytes are written.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from service.errors import ErrorCode, ServiceError
from service.ingest.images import IMAGE_EXTENSIONS, inspect_image
from service.ingest.layout import Layout, Manifest, is_hidden, unsafe_reason
from service.ingest.manifest import MANIFEST_SUFFIXES, MULTI_LABEL, SINGLE_LABEL, Labels
from service.ingest.manifest_stream import read_manifest
from service.ingest.model import MAX_LISTED, IngestReport, Limits
from service.ingest.report import build_report
from service.ingest.sources import Archive, EntryTooLarge, S3Prefix

log = logging.getLogger(__name__)


def ingest_archive(src: BinaryIO, out_zip: Path, limits: Limits) -> IngestReport:
    """An uploaded zip or tar (any compression tarfile reads), as a file object on disk."""
    archive = Archive(src, limits)
    try:
        return _ingest(archive, out_zip, limits)
    finally:
        archive.close()


def ingest_s3_prefix(client: Any, uri: str, out_zip: Path, limits: Limits) -> IngestReport:
    """Objects already in the object store, laid out like an archive under `uri`."""
    return _ingest(S3Prefix(client, uri), out_zip, limits)


@dataclass
class _Found:
    """What the passes sort the entries into."""

    images: list[str] = field(default_factory=list)
    manifests: list[Manifest] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    class_of: list[Labels] = field(default_factory=list)  # accepted[i]'s class name(s)


def _ingest(archive: Archive | S3Prefix, out_zip: Path, limits: Limits) -> IngestReport:
    found = _list(archive, limits)
    if not found.images and not found.rejected:
        raise ServiceError(
            ErrorCode.DATASET_EMPTY,
            "the archive contains no image files; expected class folders with images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))})",
            {"skipped": found.skipped[:MAX_LISTED]},
        )
    if len(found.manifests) > 1:
        raise ServiceError(
            ErrorCode.DATASET_LAYOUT,
            f"found {len(found.manifests)} manifests "
            f"({', '.join(n for n, _ in found.manifests)}); keep one",
        )
    manifest = found.manifests[0] if found.manifests else None
    layout = Layout(found.images, manifest)
    _copy(archive, layout, found, out_zip, limits)
    if layout.kind == "manifest" and layout.manifest is not None:
        listed = set(layout.manifest)
        present = {a["source"] for a in found.accepted} | {r["path"] for r in found.rejected}
        absent = listed - present - {s["path"] for s in found.skipped}
        for missing in sorted(absent)[:MAX_LISTED]:
            found.rejected.append(
                {"path": missing, "reason": "listed in the manifest but not in the archive"}
            )
    return _finish(found, layout.kind, archive.format, limits)


def _list(archive: Archive | S3Prefix, limits: Limits) -> _Found:
    """Pass 1: names and kinds only; no image bytes are read."""
    found = _Found()
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
        reason = unsafe_reason(entry)
        if reason:
            found.rejected.append({"path": entry.name, "reason": reason})
            continue
        parts = PurePosixPath(entry.name).parts
        if is_hidden(parts):
            continue  # .DS_Store, __MACOSX/, .ipynb_checkpoints/ ...: silently ignored
        suffix = PurePosixPath(entry.name).suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            found.images.append(entry.name)
        elif suffix in MANIFEST_SUFFIXES and len(parts) <= 2:
            found.manifests.append((entry.name, read_manifest(entry, limits)))
        else:
            found.skipped.append({"path": entry.name, "reason": "not an image file (by extension)"})
    return found


def _copy(
    archive: Archive | S3Prefix, layout: Layout, found: _Found, out_zip: Path, limits: Limits
) -> None:
    """Pass 2: read, decode, fingerprint and copy each placed image into `out_zip`."""
    rejected = found.rejected
    wanted = set(found.images)
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
                (found.skipped if layout.kind == "manifest" else rejected).append(
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
            member = f"images/{len(found.accepted):07d}{PurePosixPath(entry.name).suffix.lower()}"
            out.writestr(member, data)
            found.accepted.append(
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
            found.class_of.append(cls)


def _finish(found: _Found, layout: str, fmt: str, limits: Limits) -> IngestReport:
    """Number the classes and check there are enough of them, and enough images in each."""
    accepted, class_of, rejected, skipped = (
        found.accepted,
        found.class_of,
        found.rejected,
        found.skipped,
    )
    extra = {"rejected": rejected[:MAX_LISTED], "skipped": skipped[:MAX_LISTED]}
    if not accepted:
        first = rejected[0] if rejected else {"path": "-", "reason": "no images"}
        raise ServiceError(
            ErrorCode.DATASET_NO_VALID_IMAGES,
            f"no usable images: all {len(rejected)} image entries were rejected "
            f"(first: {first['path']}: {first['reason']})",
            extra,
        )
    # A multi-label manifest gives each image a tuple of names; a single label is one name.
    task = MULTI_LABEL if any(isinstance(c, tuple) for c in class_of) else SINGLE_LABEL
    names_of = [c if isinstance(c, tuple) else (c,) for c in class_of]
    classes = sorted({n for names in names_of for n in names})
    if len(classes) < 2:
        raise ServiceError(
            ErrorCode.DATASET_TOO_FEW_CLASSES,
            f"found only one class ({classes[0]!r}); a classifier needs at least 2 classes, "
            "each a folder (or a manifest label) holding that class's images",
            extra,
        )
    label = {c: i for i, c in enumerate(classes)}
    for entry, names in zip(accepted, names_of, strict=True):
        ids = sorted(label[n] for n in names)
        entry["label"] = ids[0]  # what single-label code reads
        if task == MULTI_LABEL:
            entry["labels"] = ids
    # With given splits, the training split is what must be large enough; a multi-label
    # image counts for each of its classes.
    has_train = any(e["split"] == "train" for e in accepted)
    counted = Counter(
        n
        for names, e in zip(names_of, accepted, strict=True)
        if not has_train or e["split"] == "train"
        for n in names
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
    return IngestReport(classes, accepted, rejected, skipped, layout, fmt, details, task)

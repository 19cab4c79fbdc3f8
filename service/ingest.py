"""Turn an uploaded archive into a validated dataset index.

The archive is read entry by entry from a file on disk; each image is fully decoded once
with Pillow (restricted to the formats we accept) so that a job never meets a file it
cannot read. Nothing here touches the object store or the database: the route writes
only after the whole archive has been checked.
"""

from __future__ import annotations

import hashlib
import io
import logging
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from service.errors import ErrorCode, ServiceError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PIL_FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]
SYSTEM_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
MAX_ENTRY_BYTES = 256 * 1024 * 1024
MAX_LISTED = 50  # rejected/skipped entries echoed back in one response


@dataclass
class Entry:
    path: str  # member name inside the archive
    label: int
    width: int
    height: int
    sha256: str


@dataclass
class IngestReport:
    classes: list[str]
    entries: list[Entry]
    rejected: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def class_counts(self) -> dict[str, int]:
        counts = Counter(e.label for e in self.entries)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def index(self) -> dict[str, Any]:
        """The JSON document stored beside the archive; the worker trains from it."""
        return {
            "version": 1,
            "format": "zip",
            "classes": self.classes,
            "entries": [
                {"path": e.path, "label": e.label, "w": e.width, "h": e.height, "sha256": e.sha256}
                for e in self.entries
            ],
        }


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p in SYSTEM_NAMES for p in parts)


def _unsafe_reason(name: str, info: zipfile.ZipInfo) -> str | None:
    if "\\" in name:
        return "path contains a backslash"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if any(p == ".." for p in name.split("/")):
        return "path escapes the archive ('..')"
    # Unix file type bits, when the archiver recorded them (many write permissions only).
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
        return "not a regular file (symlink or device)"
    return None


def _decode(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Fully decode an image; raise ValueError with a readable reason."""
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(
                    f"image is {width}x{height} = {width * height} pixels, over the "
                    f"limit of {max_pixels} (MAX_IMAGE_PIXELS)"
                )
            img.load()
            return width, height
    except UnidentifiedImageError as exc:
        raise ValueError(f"not a readable image (accepted: {', '.join(PIL_FORMATS)})") from exc
    except Image.DecompressionBombError as exc:
        raise ValueError(f"decompression bomb: {exc}") from exc
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"image data is corrupt or truncated: {exc}") from exc


def _common_top(names: list[str]) -> str | None:
    """A single folder wrapping the whole tree (`digits/0/a.png`) is not a class."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all(n.count("/") >= 2 for n in names):
        return tops.pop()
    return None


def ingest_zip(fileobj: BinaryIO, *, max_pixels: int, min_per_class: int) -> IngestReport:
    """Validate an ImageFolder zip (one folder per class) and build its index."""
    fileobj.seek(0)
    if not zipfile.is_zipfile(fileobj):
        raise ServiceError(
            ErrorCode.DATASET_NOT_ZIP,
            "the upload is not a zip archive; send a .zip in ImageFolder layout "
            "(one folder per class, images inside)",
        )
    fileobj.seek(0)
    try:
        zf = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ServiceError(
            ErrorCode.DATASET_NOT_ZIP, f"the zip archive is unreadable: {exc}"
        ) from exc

    rejected: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    candidates: list[zipfile.ZipInfo] = []
    with zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir():
                continue
            reason = _unsafe_reason(name, info)
            if reason:
                rejected.append({"path": name, "reason": reason})
                continue
            parts = PurePosixPath(name).parts
            if _is_hidden(parts):
                continue  # .DS_Store, __MACOSX/, .ipynb_checkpoints/ ...: silently ignored
            if PurePosixPath(name).suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append({"path": name, "reason": "not an image file (by extension)"})
                continue
            candidates.append(info)

        if not candidates and not rejected:
            raise ServiceError(
                ErrorCode.DATASET_EMPTY,
                "the archive contains no image files; expected class folders with images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})",
                {"skipped": skipped[:MAX_LISTED]},
            )

        top = _common_top([c.filename for c in candidates]) if candidates else None
        by_class: dict[str, list[tuple[zipfile.ZipInfo, int, int, str]]] = {}
        for info in candidates:
            rel = info.filename[len(top) + 1 :] if top else info.filename
            if "/" not in rel:
                rejected.append(
                    {"path": info.filename, "reason": "image is not inside a class folder"}
                )
                continue
            if info.file_size > MAX_ENTRY_BYTES:
                rejected.append(
                    {"path": info.filename, "reason": f"entry larger than {MAX_ENTRY_BYTES} bytes"}
                )
                continue
            try:
                data = zf.read(info)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                rejected.append({"path": info.filename, "reason": f"cannot extract: {exc}"})
                continue
            try:
                width, height = _decode(data, max_pixels)
            except ValueError as exc:
                rejected.append({"path": info.filename, "reason": str(exc)})
                continue
            cls = rel.split("/", 1)[0]
            digest = hashlib.sha256(data).hexdigest()
            by_class.setdefault(cls, []).append((info, width, height, digest))

    if not by_class:
        raise ServiceError(
            ErrorCode.DATASET_NO_VALID_IMAGES,
            f"no usable images: all {len(rejected)} image entries were rejected "
            f"(first: {rejected[0]['path']}: {rejected[0]['reason']})",
            {"rejected": rejected[:MAX_LISTED]},
        )
    classes = sorted(by_class)
    if len(classes) < 2:
        raise ServiceError(
            ErrorCode.DATASET_TOO_FEW_CLASSES,
            f"found only one class folder ({classes[0]!r}); a classifier needs at least 2 "
            "class folders, each holding that class's images",
            {"rejected": rejected[:MAX_LISTED]},
        )
    small = {c: len(v) for c, v in by_class.items() if len(v) < min_per_class}
    if small:
        listed = ", ".join(f"{c!r} has {n}" for c, n in sorted(small.items()))
        raise ServiceError(
            ErrorCode.DATASET_CLASS_TOO_SMALL,
            f"every class needs at least {min_per_class} usable images: {listed}",
            {"rejected": rejected[:MAX_LISTED]},
        )

    entries = [
        Entry(path=info.filename, label=label, width=w, height=h, sha256=digest)
        for label, cls in enumerate(classes)
        for info, w, h, digest in sorted(by_class[cls], key=lambda t: t[0].filename)
    ]
    log.info(
        "ingested %d images in %d classes (%d rejected, %d skipped)",
        len(entries),
        len(classes),
        len(rejected),
        len(skipped),
    )
    return IngestReport(classes=classes, entries=entries, rejected=rejected, skipped=skipped)

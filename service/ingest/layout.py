"""Where an image's class and split come from: its folders (ImageFolder, or train/val/test
folders holding class folders) or a manifest; and which entries are never images."""

from __future__ import annotations

from pathlib import PurePosixPath

from service.ingest.manifest import Labels
from service.ingest.sources import RawEntry

SYSTEM_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}

# A parsed manifest: its archive path, and image path (relative to it) -> (label, split);
# the label is a tuple of class names in a multi-label manifest.
Manifest = tuple[str, dict[str, tuple[Labels, str | None]]]


def is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p in SYSTEM_NAMES for p in parts)


def unsafe_reason(entry: RawEntry) -> str | None:
    if entry.problem:
        return entry.problem
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


def common_top(names: list[str]) -> str | None:
    """A single folder wrapping the whole tree (`digits/0/a.png`) is not a class."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all(n.count("/") >= 2 for n in names):
        return tops.pop()
    return None


class Layout:
    """Where an image's class and split come from."""

    def __init__(self, image_names: list[str], manifest: Manifest | None):
        self.top = common_top(image_names) if image_names else None
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

    def locate(self, name: str) -> tuple[Labels, str | None] | str:
        """(class or classes, split), or the reason the image has no place."""
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

"""Streamed uploads: a multipart body built as a generator, so an archive of any size is
sent in 64 KiB chunks with a byte count for the progress bar, and a folder is zipped on the
fly while it streams (no temporary archive on disk, one chunk in memory).

The zip is written by `zipfile` into a buffer that the generator drains after every chunk;
the output is not seekable, so each entry carries a data descriptor and the central
directory comes last, which every zip reader (the service's included) reads."""

from __future__ import annotations

import os
import secrets
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 16
ARCHIVE_TYPES = {
    ".zip": "application/zip",
    ".tar": "application/x-tar",
    ".tgz": "application/gzip",
    ".gz": "application/gzip",
}


class _Sink:
    """A write-only, unseekable file for `zipfile`: what is written waits here until the
    generator takes it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def folder_files(folder: Path) -> list[Path]:
    """Regular files under `folder`, sorted, hidden ones (".DS_Store", ".git/") left out;
    symbolic links are not followed out of the folder."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or not stat.S_ISREG(path.lstat().st_mode):
                continue
            found.append(path)
    return found


def zip_stream(folder: Path, files: list[Path] | None = None) -> Iterator[bytes]:
    """The folder as a zip, in chunks, paths relative to the folder. Images are already
    compressed, so entries are stored: no CPU spent, no size gained."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as zf:  # type: ignore[call-overload]
        for path in files if files is not None else folder_files(folder):
            info = zipfile.ZipInfo.from_file(path, path.relative_to(folder).as_posix())
            info.compress_type = zipfile.ZIP_STORED
            with open(path, "rb") as src, zf.open(info, "w") as dest:
                while chunk := src.read(CHUNK):
                    dest.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


@dataclass
class Body:
    """A multipart body: its chunks, its content type, and its length when known (a file),
    or None (a folder zipped on the fly; sent chunked)."""

    chunks: Iterator[bytes]
    content_type: str
    length: int | None
    expected: int  # bytes the progress bar counts to (the payload, near enough for a folder)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def multipart(path: Path, fields: dict[str, str], file_field: str = "file") -> Body:
    """`fields` as form fields, then `path` (an archive as it is, a folder zipped) as the
    file part."""
    boundary = f"finetune-{secrets.token_hex(16)}"
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode()
        + v.encode()
        + b"\r\n"
        for k, v in fields.items()
    )
    if path.is_dir():
        files = folder_files(path)
        if not files:
            raise ValueError(f"{path} holds no files to upload")
        payload, length = zip_stream(path, files), None
        expected = sum(f.stat().st_size for f in files)
        filename, media = f"{path.resolve().name or 'dataset'}.zip", "application/zip"
    elif path.is_file():
        payload, length = _file_chunks(path), path.stat().st_size
        expected, filename = length, path.name
        media = ARCHIVE_TYPES.get(path.suffix.lower(), "application/octet-stream")
    else:
        raise FileNotFoundError(f"{path} is neither a folder nor a file")
    safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
        f'filename="{safe}"\r\nContent-Type: {media}\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        yield from payload
        yield tail

    total = None if length is None else len(head) + length + len(tail)
    return Body(chunks(), f"multipart/form-data; boundary={boundary}", total, expected)


def counted(
    chunks: Iterator[bytes], expected: int, progress: Callable[[int, int | None], None] | None
) -> Iterator[bytes]:
    """The chunks, reporting the bytes sent so far (capped at `expected`, which for a
    folder is the files' size, a little under the zip's)."""
    sent = 0
    for chunk in chunks:
        if not chunk:
            continue
        sent += len(chunk)
        yield chunk
        if progress:
            progress(min(sent, expected), expected)

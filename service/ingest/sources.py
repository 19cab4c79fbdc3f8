"""Read archives entry by entry: zip, tar, tar.gz, or the objects under an S3 prefix. Each
source yields `RawEntry`s in archive order; nothing is extracted to disk, and an entry's bytes
are read only when asked for, with a hard cap. Tars go through `tarstream`, which bounds every
header before reading it; bzip2, xz and zstd are refused rather than decompressed."""

from __future__ import annotations

import io
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from service.errors import ErrorCode, ServiceError
from service.ingest.model import Limits
from service.ingest.tarstream import CorruptTar, NotTar, TarMember, TarReader

FORMATS_HELP = "a .zip, .tar, .tar.gz or .tgz archive"
NOT_ARCHIVE = (
    f"the upload is not a readable archive; send {FORMATS_HELP} in ImageFolder "
    "layout (one folder per class), optionally with train/val/test folders or a "
    "labels.csv manifest"
)
# Compressions `tarfile` would open but the service does not accept: bzip2 and xz reach
# ratios of millions to one, and the README never listed them.
REFUSED_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
GZIP_MAGIC = b"\x1f\x8b"
# bzip2 and lzma members inflate a whole read chunk at once, past any declared size.
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# What a member's decompressor may raise on corrupt or unsupported data.
EXTRACT_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    ValueError,
    RuntimeError,  # encrypted
    NotImplementedError,  # unknown compression method
)


class EntryTooLarge(Exception):
    pass


@dataclass
class RawEntry:
    name: str
    kind: str  # "file", "dir", "link", "device"
    size: int  # declared uncompressed size
    compressed_size: int | None  # zip only
    opener: Callable[[], BinaryIO]
    # Why the entry must be rejected whatever its kind: a name that is not UTF-8, a second
    # entry with the same name, a sparse file.
    problem: str | None = None

    def read(self, limit: int) -> bytes:
        """The entry's bytes; EntryTooLarge past `limit` (a lying header changes nothing)."""
        with self.opener() as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise EntryTooLarge
        return data


class _Guarded(io.RawIOBase):
    """A zip member whose decompression errors are OSErrors: one rejected file each."""

    def __init__(self, f: IO[bytes]):
        self._f = f

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        try:
            return self._f.read(-1 if n is None else n)
        except EXTRACT_ERRORS as exc:
            raise OSError(f"corrupt data: {exc}") from exc

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> BinaryIO:
    if info.compress_type not in ZIP_METHODS:
        raise OSError(
            f"compression method {info.compress_type} is not accepted "
            f"(only {' and '.join(ZIP_METHODS.values())})"
        )
    if info.flag_bits & 0x1:
        raise OSError("the entry is encrypted")
    try:
        return _Guarded(zf.open(info))  # type: ignore[return-value]
    except EXTRACT_ERRORS as exc:
        raise OSError(str(exc)) from exc


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return "dir"
    file_type = stat.S_IFMT(info.external_attr >> 16)  # when the archiver recorded it
    if file_type == stat.S_IFLNK:
        return "link"
    if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
        return "device"
    return "file"


def _zip_entries(zf: zipfile.ZipFile) -> Iterator[RawEntry]:
    seen: set[str] = set()
    for info in zf.infolist():
        kind = _zip_kind(info)
        problem = None
        if kind != "dir":
            if info.filename in seen:
                problem = "duplicate path in archive"
            seen.add(info.filename)
        yield RawEntry(
            name=info.filename,
            kind=kind,
            size=info.file_size,
            compressed_size=info.compress_size,
            opener=lambda info=info: _open_zip_member(zf, info),  # type: ignore[misc]
            problem=problem,
        )


def _not_regular() -> BinaryIO:
    raise OSError("not a regular file")


def _tar_entry(reader: TarReader, member: TarMember) -> RawEntry:
    def opener() -> BinaryIO:
        return reader.open(member)

    return RawEntry(
        member.name,
        member.kind,
        member.size,
        None,
        opener if member.kind == "file" else _not_regular,
        member.problem,
    )


class Archive:
    """An uploaded archive on disk, opened by content (not by file name). `limits` bounds
    what a tar may expand to, skipped entries included."""

    def __init__(self, fileobj: BinaryIO, limits: Limits | None = None):
        self.fileobj = fileobj
        self.size = fileobj.seek(0, 2)
        fileobj.seek(0)
        self._zip: zipfile.ZipFile | None = None
        self._tar: TarReader | None = None
        if zipfile.is_zipfile(fileobj):
            fileobj.seek(0)
            self.format = "zip"
            try:
                self._zip = zipfile.ZipFile(fileobj)
            except UnicodeDecodeError as exc:
                raise ServiceError(
                    ErrorCode.DATASET_NOT_ARCHIVE,
                    "the zip archive flags a file name as UTF-8 but it is not valid UTF-8 "
                    f"({exc.object[:60]!r}); re-create the archive with UTF-8 names",
                ) from exc
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise ServiceError(
                    ErrorCode.DATASET_NOT_ARCHIVE, f"the zip archive is unreadable: {exc}"
                ) from exc
            return
        fileobj.seek(0)
        head = fileobj.read(8)
        for magic, name in REFUSED_MAGIC.items():
            if head.startswith(magic):
                raise ServiceError(
                    ErrorCode.DATASET_NOT_ARCHIVE,
                    f"{name}-compressed archives are not accepted; send {FORMATS_HELP}",
                )
        self.format = "tar"
        compressed = head.startswith(GZIP_MAGIC)
        self._tar = TarReader(fileobj, compressed, limits or Limits(), self.size)

    def entries(self) -> Iterator[RawEntry]:
        if self._zip is not None:
            yield from _zip_entries(self._zip)
            return
        reader = self._tar
        assert reader is not None
        try:
            for member in reader.members():
                yield _tar_entry(reader, member)
        except NotTar as exc:
            raise ServiceError(ErrorCode.DATASET_NOT_ARCHIVE, NOT_ARCHIVE) from exc
        except CorruptTar as exc:
            raise ServiceError(
                ErrorCode.DATASET_NOT_ARCHIVE, f"the tar archive is truncated or corrupt: {exc}"
            ) from exc

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()


class S3Prefix:
    """The objects under `s3://bucket/prefix/`, read as if they were an archive's entries
    (for datasets too large to pass through the API)."""

    format = "s3"

    def __init__(self, client: Any, uri: str):
        if not uri.startswith("s3://") or "/" not in uri[5:]:
            raise ServiceError(
                ErrorCode.VALIDATION_ERROR, f"source {uri!r} is not of the form s3://bucket/prefix"
            )
        self.client = client
        self.bucket, prefix = uri[5:].split("/", 1)
        self.prefix = prefix.rstrip("/") + "/"
        self.objects: list[tuple[str, int]] = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            ):
                self.objects += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
        except Exception as exc:  # botocore's errors: no such bucket, access denied, ...
            raise ServiceError(ErrorCode.DATASET_NOT_FOUND, f"cannot list {uri}: {exc}") from exc
        if not self.objects:
            raise ServiceError(ErrorCode.DATASET_EMPTY, f"no objects under {uri}")
        self.size = sum(size for _, size in self.objects)

    def entries(self) -> Iterator[RawEntry]:
        for key, size in self.objects:

            def opener(key: str = key) -> Any:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]

            yield RawEntry(key[len(self.prefix) :], "file", size, None, opener)

    def close(self) -> None:
        pass

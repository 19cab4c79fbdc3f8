"""Read archives entry by entry: zip, tar, tar.gz (and anything tarfile opens), or the
objects under an S3 prefix. Each source yields `RawEntry`s in archive order; nothing is
extracted to disk, and an entry's bytes are read only when asked for, with a hard cap."""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from service.errors import ErrorCode, ServiceError

FORMATS_HELP = "a .zip, .tar, .tar.gz or .tgz archive"


class EntryTooLarge(Exception):
    pass


@dataclass
class RawEntry:
    name: str
    kind: str  # "file", "dir", "link", "device"
    size: int  # declared uncompressed size
    compressed_size: int | None  # zip only
    opener: Callable[[], BinaryIO]

    def read(self, limit: int) -> bytes:
        """The entry's bytes; EntryTooLarge past `limit` (a lying header changes nothing)."""
        with self.opener() as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise EntryTooLarge
        return data


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
    for info in zf.infolist():
        yield RawEntry(
            name=info.filename,
            kind=_zip_kind(info),
            size=info.file_size,
            compressed_size=info.compress_size,
            opener=lambda info=info: zf.open(info),  # type: ignore[misc, arg-type]
        )


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return "dir"
    if member.issym() or member.islnk():
        return "link"
    if not member.isfile():
        return "device"
    return "file"


def _tar_entries(tf: tarfile.TarFile) -> Iterator[RawEntry]:
    for member in tf:

        def opener(member: tarfile.TarInfo = member) -> Any:
            f = tf.extractfile(member)
            if f is None:
                raise OSError("not a regular file")
            return f

        yield RawEntry(member.name, _tar_kind(member), member.size, None, opener)


class Archive:
    """An uploaded archive on disk, opened by content (not by file name)."""

    def __init__(self, fileobj: BinaryIO):
        self.fileobj = fileobj
        fileobj.seek(0)
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        if zipfile.is_zipfile(fileobj):
            fileobj.seek(0)
            try:
                self._zip = zipfile.ZipFile(fileobj)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ServiceError(
                    ErrorCode.DATASET_NOT_ARCHIVE, f"the zip archive is unreadable: {exc}"
                ) from exc
            self.format = "zip"
            self.size = fileobj.seek(0, 2)
            return
        fileobj.seek(0)
        try:
            self._tar = tarfile.open(fileobj=fileobj, mode="r:*")  # noqa: SIM115 - closed in close()
            self.format = "tar"
            self.size = fileobj.seek(0, 2)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ServiceError(
                ErrorCode.DATASET_NOT_ARCHIVE,
                f"the upload is not a readable archive; send {FORMATS_HELP} in ImageFolder "
                "layout (one folder per class), optionally with train/val/test folders or a "
                "labels.csv manifest",
            ) from exc

    def entries(self) -> Iterator[RawEntry]:
        if self._zip is not None:
            yield from _zip_entries(self._zip)
        else:
            assert self._tar is not None
            self.fileobj.seek(0)
            # Re-open for each pass: a compressed tar streams forward only.
            with tarfile.open(fileobj=self.fileobj, mode="r:*") as tf:
                try:
                    yield from _tar_entries(tf)
                except (tarfile.TarError, EOFError, OSError) as exc:
                    raise ServiceError(
                        ErrorCode.DATASET_NOT_ARCHIVE,
                        f"the tar archive is truncated or corrupt: {exc}",
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

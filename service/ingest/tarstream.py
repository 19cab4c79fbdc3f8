"""A bounded tar reader for untrusted uploads (plain or gzip-compressed).

`tarfile` trusts the archive: it reads a pax header or a GNU long name whole, whatever size
the header declares, recurses once per chained extension header, and before 3.11.10 runs a
regex over pax headers that is quadratic in a run of digits (CVE-2024-6232). So headers are
parsed here, from 512-byte blocks: `tarfile.TarInfo.frombuf` decodes one fixed-size block
(checksum, octal and base-256 numbers), and everything it would read beyond that block is
checked before it is read:

- a pax header or GNU long name/link over `MAX_META_BYTES` is refused unread (413), and pax
  records are split here, with a cap on the length prefix, never by tarfile's regex;
- every byte the archive expands to (headers, skipped entries, padding) is charged against
  `max_total_bytes` and `max_compression_ratio` before it is decompressed, using the sizes
  the headers declare, so a run of zeros in a skipped `notes.txt` is refused, not inflated;
- names that are not UTF-8, or hold a NUL, and a second entry with an already-seen name
  are marked with a `problem` (the entry is rejected, not read).

The headers are parsed once: the first pass records every member (name, kind, size, data
offset); later passes replay the records and only seek (plain tar) or decompress forward
(gzip) to the data they read.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from service.errors import ErrorCode, ServiceError
from service.ingest.model import Limits

BLOCK = 512
MAX_META_BYTES = 64 * 1024  # one pax header or GNU long name; real ones are a few hundred bytes
MAX_META_RUN = 8  # extension headers in a row before one member
MAX_LENGTH_DIGITS = len(str(MAX_META_BYTES))  # a pax record's length prefix
CHUNK = 1024 * 1024  # skipped data is decompressed (and dropped) this much at a time
ZERO_BLOCK = bytes(BLOCK)
META_TYPES = {
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
}
FILE_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE}
LINK_TYPES = {tarfile.SYMTYPE, tarfile.LNKTYPE}


class NotTar(Exception):
    """The first block is not a tar header."""


class CorruptTar(OSError):
    """Malformed headers or data that ends early; an OSError so a failed entry read is one
    rejected file, like any other extraction error."""


@dataclass(slots=True)
class TarMember:
    name: str
    kind: str  # "file", "dir", "link", "device"
    size: int  # bytes of data following the header
    offset: int  # where the data starts in the uncompressed tar
    problem: str | None = None


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class _Cursor(io.RawIOBase):
    """Its own read position in a file that other readers share (gzip reads ahead)."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        self._f.seek(self._pos)
        data = self._f.read(len(b))
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _Stream:
    """The uncompressed tar, read forward from its start; `pos` is the offset reached."""

    def __init__(self, fileobj: BinaryIO, compressed: bool):
        self._file = fileobj
        self._gz = gzip.GzipFile(fileobj=_Cursor(fileobj), mode="rb") if compressed else None
        self.pos = 0

    def read(self, n: int) -> bytes:
        try:
            if self._gz is None:
                self._file.seek(self.pos)
                data = self._file.read(n)
            else:
                data = self._gz.read(n)
        except (EOFError, OSError, zlib.error) as exc:
            raise CorruptTar(f"the compressed data is corrupt: {exc}") from exc
        self.pos += len(data)
        return data

    def skip_to(self, pos: int) -> None:
        if self._gz is None:
            self.pos = pos  # a plain tar is seeked, never read through
            return
        while self.pos < pos:
            if not self.read(min(CHUNK, pos - self.pos)):
                raise CorruptTar("the tar data ends early")

    def close(self) -> None:
        if self._gz is not None:
            self._gz.close()


class _Slice(io.RawIOBase):
    """One member's data, read from a stream positioned at its start."""

    def __init__(self, stream: _Stream, size: int):
        self._stream = stream
        self._next = stream.pos
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        # Sized to what is left, not to `n`: callers ask for limit + 1 bytes.
        n = self._left if n is None or n < 0 else min(n, self._left)
        if n == 0:
            return b""
        if self._stream.pos != self._next:
            raise CorruptTar("the tar stream has moved past this entry")
        data = self._stream.read(n)
        if len(data) < n:
            raise CorruptTar("the tar data ends early")
        self._left -= n
        self._next += n
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def parse_pax(data: bytes) -> dict[str, bytes]:
    """`"%d %s=%s\\n"` records; CorruptTar on anything else. The length prefix is capped,
    so a run of digits costs nothing (tarfile's regex was quadratic in it)."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:  # NUL padding ends the records
        space = data.find(b" ", pos, pos + MAX_LENGTH_DIGITS + 1)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise CorruptTar(f"malformed pax record at byte {pos} of its header")
        end = pos + int(digits)
        if end <= space + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise CorruptTar(f"pax record at byte {pos} has a wrong length")
        keyword, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not keyword:
            raise CorruptTar(f"pax record at byte {pos} has no keyword")
        records[keyword.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def _kind(type_: bytes) -> str:
    if type_ == tarfile.DIRTYPE:
        return "dir"
    if type_ in LINK_TYPES:
        return "link"
    return "file" if type_ in FILE_TYPES else "device"


def _clean_name(raw: str) -> tuple[str, str | None]:
    """The name to show (always valid text) and what is wrong with it, if anything."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        shown = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return shown, "file name is not valid UTF-8"
    if "\0" in raw:
        return raw.replace("\0", "\ufffd"), "file name contains a NUL byte"
    return raw, None


class _Budget:
    """Every byte the archive expands to, checked before it is read."""

    def __init__(self, limits: Limits, archive_size: int):
        self.limits = limits
        self.archive_size = max(1, archive_size)

    def charge(self, end: int) -> None:
        if end > self.limits.max_total_bytes:
            raise ServiceError(
                ErrorCode.DATASET_LIMIT,
                f"the archive expands past {self.limits.max_total_bytes} bytes (MAX_DATASET_BYTES)",
            )
        if end / self.archive_size > self.limits.max_compression_ratio:
            raise ServiceError(
                ErrorCode.DATASET_LIMIT,
                f"the archive expands more than {self.limits.max_compression_ratio:g}x its size "
                "(MAX_COMPRESSION_RATIO): refused as a decompression bomb",
            )


class TarReader:
    """The members of a tar in `fileobj`: scanned on the first pass, replayed after."""

    def __init__(self, fileobj: BinaryIO, compressed: bool, limits: Limits, archive_size: int):
        self._fileobj = fileobj
        self._compressed = compressed
        self._budget = _Budget(limits, archive_size)
        self._members: list[TarMember] | None = None
        self._scan_stream: _Stream | None = None
        self._live: TarMember | None = None  # the member the scan is stopped at
        self._replay: _Stream | None = None

    def members(self) -> Iterator[TarMember]:
        if self._members is not None:
            yield from self._members
            return
        members = []
        for member in self._scan():
            members.append(member)
            self._live = member
            try:
                yield member
            finally:
                self._live = None
        self._members = members

    def open(self, member: TarMember) -> BinaryIO:
        """The member's data: from the scan when it is stopped right there (a manifest read
        in the first pass), else from a replay stream moving forward."""
        live = self._scan_stream
        if self._live is member and live is not None and live.pos == member.offset:
            return _Slice(live, member.size)  # type: ignore[return-value]
        if self._replay is None or self._replay.pos > member.offset:
            if self._replay is not None:
                self._replay.close()
            self._replay = _Stream(self._fileobj, self._compressed)
        self._replay.skip_to(member.offset)
        return _Slice(self._replay, member.size)  # type: ignore[return-value]

    def close(self) -> None:
        for stream in (self._scan_stream, self._replay):
            if stream is not None:
                stream.close()

    def _scan(self) -> Iterator[TarMember]:
        if self._scan_stream is not None:
            self._scan_stream.close()  # an earlier scan that was abandoned part-way
        stream = self._scan_stream = _Stream(self._fileobj, self._compressed)
        seen: set[str] = set()
        count = 0
        while True:
            at = stream.pos
            info, pending = self._next_header(stream)
            if info is None:
                if at == 0:
                    raise NotTar("no tar header")
                return
            member = self._member(stream, info, pending, seen)
            count += 1
            if count > self._budget.limits.max_entries:
                raise ServiceError(
                    ErrorCode.DATASET_LIMIT,
                    f"the archive has more than {self._budget.limits.max_entries} entries "
                    "(MAX_ARCHIVE_ENTRIES)",
                )
            yield member
            stream.skip_to(member.offset + _padded(member.size))

    def _next_header(self, stream: _Stream) -> tuple[tarfile.TarInfo | None, dict[str, str]]:
        """The next member's header and what extension headers before it said (path, size,
        sparse); (None, {}) at the end of the archive."""
        pending: dict[str, str] = {}
        for _ in range(MAX_META_RUN + 1):
            at = stream.pos
            buf = stream.read(BLOCK)
            if not buf or buf == ZERO_BLOCK:
                if pending:
                    raise CorruptTar(f"the archive ends after an extension header at byte {at}")
                return None, {}
            try:
                info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                if at == 0:
                    raise NotTar(str(exc)) from exc
                raise CorruptTar(f"bad header at byte {at}: {exc}") from exc
            if info.size < 0:
                raise CorruptTar(f"negative size in the header at byte {at}")
            if info.type not in META_TYPES:
                return info, pending
            if info.size > MAX_META_BYTES:
                raise ServiceError(
                    ErrorCode.DATASET_LIMIT,
                    f"the tar extension header at byte {at} declares {info.size} bytes "
                    f"(a pax header or GNU long name); the limit is {MAX_META_BYTES}",
                )
            self._budget.charge(stream.pos + _padded(info.size))
            data = stream.read(_padded(info.size))[: info.size]
            if len(data) < info.size:
                raise CorruptTar(f"the extension header at byte {at} ends early")
            self._apply_meta(info.type, data, pending)
        raise CorruptTar(f"more than {MAX_META_RUN} extension headers in a row")

    @staticmethod
    def _apply_meta(type_: bytes, data: bytes, pending: dict[str, str]) -> None:
        # The first extension header to set a field wins, as in tarfile.
        if type_ == tarfile.GNUTYPE_LONGNAME:
            pending.setdefault("path", data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
        elif type_ in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            records = parse_pax(data)
            if "path" in records:
                path = records["path"].decode("utf-8", "surrogateescape").rstrip("/")
                pending.setdefault("path", path)
            if "size" in records:
                size = records["size"]
                if not size.isdigit() or len(size) > 20:
                    raise CorruptTar(f"pax size {size[:30]!r} is not a number")
                pending.setdefault("size", size.decode())
            if any(k.startswith("GNU.sparse.") for k in records):
                pending["sparse"] = "1"
        elif type_ == tarfile.XGLTYPE:
            parse_pax(data)  # checked, then ignored: global values would rename every member
        # GNUTYPE_LONGLINK: a link target, never used.

    def _member(
        self, stream: _Stream, info: tarfile.TarInfo, pending: dict[str, str], seen: set[str]
    ) -> TarMember:
        if info.type == tarfile.GNUTYPE_SPARSE:
            extended = info._sparse_structs[1]  # type: ignore[attr-defined]
            while extended:  # old GNU sparse maps continue in blocks of their own
                self._budget.charge(stream.pos + BLOCK)
                block = stream.read(BLOCK)
                if len(block) < BLOCK:
                    raise CorruptTar("a sparse map ends early")
                extended = bool(block[504])
        kind = _kind(info.type)
        name = pending.get("path", info.name)
        if kind == "dir":
            name = name.rstrip("/")
        size = int(pending.get("size", info.size))
        # As tarfile: data follows regular files and unknown types only.
        if info.type not in tarfile.REGULAR_TYPES and info.type in tarfile.SUPPORTED_TYPES:
            size = 0
        self._budget.charge(stream.pos + _padded(size))
        name, problem = _clean_name(name)
        if info.type == tarfile.GNUTYPE_SPARSE or "sparse" in pending:
            kind, problem = "device", problem or "sparse file (not supported)"
        if kind != "dir":
            if name in seen and problem is None:
                problem = "duplicate path in archive"
            seen.add(name)
        return TarMember(name, kind, size, stream.pos, problem)

"""Hostile archives, one builder per finding of the attack review (issue 11), built in
memory from raw tar blocks and patched zips, small by default; `benchmarks/hostile_uploads.py`
builds them at full size. `corpus()` lists small ones with the outcome each must have."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zipfile
from collections.abc import Iterable
from functools import lru_cache

from service.errors import ErrorCode
from tests.helpers import noise_image, png_bytes

MiB = 1024 * 1024

# What an upload must come to: an error code (nothing stored), or a dataset of classes a and b
# whose `rejected` holds each path with a reason containing the given text.
Expected = ErrorCode | dict[str, str]


def tar_header(name: bytes, size: int, type_: bytes = b"0", linkname: bytes = b"") -> bytes:
    """One ustar header block with raw bytes for a name: any size, any name bytes."""
    buf = bytearray(512)
    buf[0 : min(100, len(name))] = name[:100]
    buf[100:108] = b"0000644\0"
    buf[108:124] = b"0000000\0" * 2
    if 0 <= size < 8**11:
        buf[124:136] = b"%011o\0" % size
    else:  # base-256, as GNU tar writes sizes over 8 GiB (and a negative one, hostile)
        buf[124:136] = (size % 256**12).to_bytes(12, "big")
        buf[124] = 0x80 if size >= 0 else 0xFF
    buf[136:148] = b"00000000000\0"
    buf[148:156] = b" " * 8
    buf[156:157] = type_
    buf[157 : 157 + len(linkname)] = linkname
    buf[257:265] = b"ustar\x0000"
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def tar_member(name: bytes, data: bytes, type_: bytes = b"0") -> bytes:
    return tar_header(name, len(data), type_) + data + bytes(-len(data) % 512)


def pax_record(keyword: str, value: bytes) -> bytes:
    body = b" " + keyword.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


TAR_END = bytes(1024)


def good_files(n: int = 2) -> list[tuple[str, bytes]]:
    return [
        (f"{c}/{i}.png", png_bytes(noise_image(1000 + i + 10 * j, 8)))
        for j, c in enumerate("ab")
        for i in range(n)
    ]


def good_members(n: int = 2) -> bytes:
    return b"".join(tar_member(name.encode(), data) for name, data in good_files(n))


def compress(data: bytes, how: str) -> bytes:
    if how == "gz":
        return gzip.compress(data, mtime=0)
    if how == "bz2":
        return bz2.compress(data)
    if how == "xz":
        return lzma.compress(data)
    return data


def zeros_then(prefix: bytes, zeros: int, suffix: bytes, how: str = "gz") -> bytes:
    """gzip (or bzip2) of prefix + `zeros` zero bytes + suffix, as a multi-member stream that
    repeats one compressed 16 MiB block: quick to build at any size."""
    chunk = 16 * MiB
    block = compress(bytes(min(zeros, chunk)), how)
    parts = [compress(prefix, how), block * (zeros // chunk)]
    if zeros % chunk:
        parts.append(compress(bytes(zeros % chunk), how))
    parts.append(compress(suffix, how))
    return b"".join(parts)


# --- the findings --------------------------------------------------------------------------


def pax_digits(digits: int = 60_000, how: str = "gz") -> bytes:
    """A pax header of one run of digits: quadratic in tarfile's hdrcharset regex."""
    body = b"0" * digits
    tar = tar_header(b"././@PaxHeader", len(body), b"x") + body + bytes(-len(body) % 512)
    return compress(tar + good_members() + TAR_END, how)


def gnu_long_name(declared: int = 300 * MiB, real: bool = False, how: str = "gz") -> bytes:
    """A GNU long name declaring `declared` bytes (tarfile reads them whole); `real` puts
    that many zero bytes there (full-size benchmark), else the archive ends early."""
    head = tar_header(b"././@LongLink", declared, b"L")
    if not real:
        return compress(head + bytes(4096), how)
    tail = bytes(-declared % 512) + good_members() + TAR_END
    return zeros_then(head, declared, tail, how)


def skipped_zeros(zeros: int = 64 * MiB, how: str = "gz") -> bytes:
    """Six images and a `notes.txt` of `zeros` zero bytes: a skipped entry, never checked."""
    head = good_members(3) + tar_header(b"notes.txt", zeros)
    tail = bytes(-zeros % 512) + TAR_END
    return zeros_then(head, zeros, tail, how)


def manifest_bomb(rows: int = 2_400_000) -> bytes:
    """A zip whose labels.csv inflates ~500x (24 MB from ~45 KB at full size)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in good_files():
            zf.writestr(name, data)
        zf.writestr("labels.csv", "path,label\n" + "a/0.png,a\n" * rows)
    return buf.getvalue()


def non_utf8_tar() -> bytes:
    """An image whose name is Latin-1 bytes (as a tar written on an old system)."""
    bad = tar_member(b"a/caf\xe9.png", png_bytes(noise_image(77, 8)))
    return good_members() + bad + TAR_END


def pax_path(value: bytes) -> bytes:
    """A member whose pax `path` is `value` (invalid UTF-8, a NUL, ...)."""
    body = pax_record("path", value)
    pax = tar_header(b"././@PaxHeader", len(body), b"x") + body + bytes(-len(body) % 512)
    return good_members() + pax + tar_member(b"a/x.png", png_bytes(noise_image(78, 8))) + TAR_END


def patch_zip_flags(data: bytes, name: bytes, bits: int) -> bytes:
    """Set general-purpose flag `bits` on `name` in its local and central headers."""
    out = bytearray(data)
    for sig, name_at, flags_at in ((b"PK\x03\x04", 30, 6), (b"PK\x01\x02", 46, 8)):
        pos = out.find(name)
        while pos >= 0:
            start = pos - name_at
            if start >= 0 and out[start : start + 4] == sig:
                flags = int.from_bytes(out[start + flags_at : start + flags_at + 2], "little")
                out[start + flags_at : start + flags_at + 2] = (flags | bits).to_bytes(2, "little")
            pos = out.find(name, pos + 1)
    return bytes(out)


def zip_of(files: Iterable[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in files:
            zf.writestr(name, data)
    return buf.getvalue()


def non_utf8_zip() -> bytes:
    """A zip flagging a name as UTF-8 whose bytes are not (zipfile raises while listing)."""
    data = zip_of([*good_files(), ("a/cafX.png", png_bytes(noise_image(79, 8)))])
    return patch_zip_flags(data, b"a/cafX.png", 0x800).replace(b"a/cafX.png", b"a/caf\xe9.png")


def link_then_file(target: bytes = b"0.png") -> bytes:
    """A symlink, then a regular file of the same name: tarfile resolved the link."""
    link = tar_header(b"a/x.png", 0, b"2", linkname=target)
    file = tar_member(b"a/x.png", png_bytes(noise_image(80, 8)))
    return good_members() + link + file + TAR_END


def duplicate_files() -> bytes:
    first = tar_member(b"a/0.png", png_bytes(noise_image(81, 8)))
    return good_members() + first + TAR_END


def zip_member_with(
    method: int = zipfile.ZIP_STORED, flags: int = 0, corrupt: bool = False
) -> bytes:
    """The good files and an `a/odd.png` stored with `method`, flagged `flags`, or with its
    deflate stream overwritten."""
    payload = png_bytes(noise_image(82, 32))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in good_files():
            zf.writestr(name, data)
        zf.writestr("a/odd.png", payload, compress_type=method)
    data = buf.getvalue()
    if flags:
        data = patch_zip_flags(data, b"a/odd.png", flags)
    if corrupt:
        at = data.find(b"a/odd.png") + len(b"a/odd.png") + 40
        data = data[:at] + b"\xff" * 64 + data[at + 64 :]
    return data


def jsonl_manifest(lines: str) -> bytes:
    return zip_of([*good_files(), ("labels.jsonl", lines.encode())])


def meta_chain(n: int = 50) -> bytes:
    body = pax_record("comment", b"x")
    pax = tar_header(b"././@PaxHeader", len(body), b"x") + body + bytes(-len(body) % 512)
    return compress(pax * n + good_members() + TAR_END, "gz")


NOT_ARCHIVE = ErrorCode.DATASET_NOT_ARCHIVE


@lru_cache(maxsize=1)
def corpus() -> list[tuple[str, bytes, Expected]]:
    """(name, archive, expected outcome) for every hostile archive, small enough for a test."""
    big_pax = tar_header(b"././@PaxHeader", 10 * MiB, b"x") + bytes(4096)
    return [
        ("pax-60000-digits", pax_digits(), ErrorCode.DATASET_NOT_ARCHIVE),
        ("pax-header-10MiB", compress(big_pax, "gz"), ErrorCode.DATASET_LIMIT),
        ("pax-chain-of-50", meta_chain(), ErrorCode.DATASET_NOT_ARCHIVE),
        ("gnu-long-name-300MB-gz", gnu_long_name(), ErrorCode.DATASET_LIMIT),
        ("gnu-long-name-300MB-bz2", gnu_long_name(how="bz2"), ErrorCode.DATASET_NOT_ARCHIVE),
        ("tar-xz", compress(good_members() + TAR_END, "xz"), ErrorCode.DATASET_NOT_ARCHIVE),
        ("skipped-zeros-gz", skipped_zeros(), ErrorCode.DATASET_LIMIT),
        ("skipped-zeros-bz2", skipped_zeros(how="bz2"), ErrorCode.DATASET_NOT_ARCHIVE),
        ("negative-size", tar_header(b"a/n.png", -1) + TAR_END, ErrorCode.DATASET_NOT_ARCHIVE),
        ("size-2^80", good_members() + tar_header(b"n.txt", 2**80), ErrorCode.DATASET_LIMIT),
        (
            "truncated-gz",
            compress(good_members(3) + TAR_END, "gz")[:-40],
            ErrorCode.DATASET_NOT_ARCHIVE,
        ),
        ("manifest-bomb", manifest_bomb(240_000), ErrorCode.DATASET_LIMIT),
        ("jsonl-deep-nesting", jsonl_manifest("[" * 100_000 + "\n"), ErrorCode.DATASET_LAYOUT),
        ("jsonl-5000-digits", jsonl_manifest("1" * 5000 + "\n"), ErrorCode.DATASET_LAYOUT),
        (
            "jsonl-lone-surrogate",
            jsonl_manifest('{"path": "a/0.png", "label": "\\ud800"}\n'),
            ErrorCode.DATASET_LAYOUT,
        ),
        ("zip-non-utf8-name", non_utf8_zip(), ErrorCode.DATASET_NOT_ARCHIVE),
        ("tar-non-utf8-name", non_utf8_tar(), {"a/caf\ufffd.png": "not valid UTF-8"}),
        ("pax-path-not-utf8", pax_path(b"a/\xff.png"), {"a/\ufffd.png": "not valid UTF-8"}),
        ("pax-path-nul", pax_path(b"a/x\0y.png"), {"a/x\ufffdy.png": "NUL"}),
        ("symlink-then-file", link_then_file(), {"a/x.png": "duplicate path"}),
        ("dangling-symlink-then-file", link_then_file(b"nowhere"), {"a/x.png": "duplicate path"}),
        ("duplicate-file", duplicate_files(), {"a/0.png": "duplicate path"}),
        ("zip-encrypted", zip_member_with(flags=0x1), {"a/odd.png": "encrypted"}),
        (
            "zip-bzip2-member",
            zip_member_with(zipfile.ZIP_BZIP2),
            {"a/odd.png": "compression method"},
        ),
        (
            "zip-corrupt-deflate",
            zip_member_with(zipfile.ZIP_DEFLATED, corrupt=True),
            {"a/odd.png": "cannot extract"},
        ),
    ]

"""Hostile archives (issue 11): each finding of the attack review is refused with a 4xx or
rejected per file, fast and with bounded memory, and never answers a 500."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.errors import ErrorCode, ServiceError
from service.ingest.manifest_stream import MAX_MANIFEST_BYTES, read_manifest_rows
from service.ingest.model import Limits
from service.ingest.tarstream import CorruptTar, parse_pax
from tests import hostile
from tests.helpers import ingest_bytes, png_bytes

SECONDS = 2.0
PEAK_MB = 50


def bounded(run: Callable[[], Any], seconds: float = SECONDS, peak_mb: float = PEAK_MB) -> Any:
    """run()'s result or ServiceError, asserting it took under `seconds` and `peak_mb`
    (tracemalloc's peak: what Python allocated, buffers of zlib and Pillow included)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        return run()
    except ServiceError as exc:
        return exc
    finally:
        took = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        assert took < seconds, f"took {took:.1f} s"
        assert peak < peak_mb, f"peak {peak:.1f} MB"


@pytest.fixture()
def ingest(tmp_path: Path) -> Callable[..., Any]:
    def run(data: bytes, **limits: Any) -> Any:
        return bounded(lambda: ingest_bytes(data, tmp_path / "out" / "images.zip", **limits))

    return run


def refused(result: Any, code: ErrorCode) -> ServiceError:
    assert isinstance(result, ServiceError), f"accepted: {result}"
    assert result.code == code and 400 <= result.status_code < 500, result.detail
    return result


def rejected(report: Any, path: str, fragment: str) -> bool:
    return any(r["path"] == path and fragment in r["reason"] for r in report.rejected)


@pytest.mark.parametrize("name", [name for name, _, _ in hostile.corpus()])
def test_every_hostile_archive_is_refused_or_rejected_fast_never_a_500(name, ingest, tmp_path):
    _, data, expected = next(c for c in hostile.corpus() if c[0] == name)
    result = ingest(data)
    if isinstance(expected, ErrorCode):
        refused(result, expected)
        return
    assert not isinstance(result, ServiceError), result.detail
    assert result.classes == ["a", "b"]
    for path, fragment in expected.items():
        assert rejected(result, path, fragment), result.rejected
    # What the dataset row stores must be strict UTF-8 JSON (PostgreSQL refuses the rest).
    json.dumps(result.summary(), ensure_ascii=False).encode("utf-8")
    assert all("\0" not in json.dumps(e) for e in result.entries)
    with zipfile.ZipFile(tmp_path / "out" / "images.zip") as zf:
        assert sorted(zf.namelist()) == sorted(e["path"] for e in result.entries)


# --- tar headers ---------------------------------------------------------------------------


def test_a_pax_header_of_60000_digits_is_refused_at_once(ingest):
    err = refused(ingest(hostile.pax_digits(60_000)), ErrorCode.DATASET_NOT_ARCHIVE)
    assert "pax record" in err.detail


def test_an_oversized_gnu_long_name_is_refused_before_it_is_read(ingest):
    err = refused(ingest(hostile.gnu_long_name(300 * 2**20)), ErrorCode.DATASET_LIMIT)
    assert str(300 * 2**20) in err.detail and "65536" in err.detail


def test_bzip2_and_xz_tars_are_refused_naming_what_is_accepted(ingest):
    for how in ("bz2", "xz"):
        data = hostile.compress(hostile.good_members() + hostile.TAR_END, how)
        err = refused(ingest(data), ErrorCode.DATASET_NOT_ARCHIVE)
        assert err.status_code == 415 and ".tar.gz" in err.detail and ".zip" in err.detail


def test_pax_records_are_split_without_a_regex():
    records = parse_pax(hostile.pax_record("path", b"a/b.png") + hostile.pax_record("size", b"7"))
    assert records == {"path": b"a/b.png", "size": b"7"}
    for bad in (b"0" * 60_000, b"5 a=b\n", b"99999999 path=x\n", b"6 ab\n"):
        with pytest.raises(CorruptTar):
            parse_pax(bad)


def test_pax_path_and_size_and_gnu_long_names_are_honoured(ingest):
    long_dir = "a/" + "d" * 150
    body = hostile.pax_record("path", b"b/pax-named.png")
    image = png_bytes(hostile.noise_image(5, 8))
    data = (
        hostile.good_members()
        + hostile.tar_header(b"././@PaxHeader", len(body), b"x")
        + body
        + bytes(-len(body) % 512)
        + hostile.tar_member(b"ignored.png", image)
        + hostile.tar_member(b"././@LongLink", long_dir.encode() + b"/1.png\0", b"L")
        + hostile.tar_member(b"short.png", image)
        + hostile.TAR_END
    )
    sources = {e["source"] for e in ingest(hostile.compress(data, "gz")).entries}
    assert {"b/pax-named.png", f"{long_dir}/1.png"} <= sources


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tars_written_by_tarfile_list_the_same_members(ingest, fmt):
    """Long and non-ASCII names (GNU long names, pax paths, ustar prefixes) and a global pax
    header, as `git archive` writes, come out as tarfile itself lists them."""
    names = [f"a/{'x' * 120}.png", "a/ü.png", f"{'d' * 90}/{'e' * 60}/b/1.png", "b/2.png"]
    if fmt == tarfile.USTAR_FORMAT:
        names = [n for n in names if n.isascii() and len(n.rsplit("/", 1)[-1]) <= 100]
    buf = io.BytesIO()
    pax = {"comment": "commit 1234"} if fmt == tarfile.PAX_FORMAT else {}
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt, pax_headers=pax) as tf:
        for i, name in enumerate(names):
            data = png_bytes(hostile.noise_image(300 + i, 8))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        listed = tf.getnames()
    report = ingest(buf.getvalue(), min_per_class=1)
    assert sorted(e["source"] for e in report.entries) == sorted(listed) == sorted(names)


def test_tar_headers_are_parsed_once_for_both_passes(ingest, monkeypatch):
    calls = []
    frombuf = tarfile.TarInfo.frombuf.__func__  # type: ignore[attr-defined]

    def counting(cls, buf, encoding, errors):
        calls.append(1)
        return frombuf(cls, buf, encoding, errors)

    monkeypatch.setattr(tarfile.TarInfo, "frombuf", classmethod(counting))
    monkeypatch.setattr(tarfile, "open", None)  # the vulnerable parser is never reached
    report = ingest(hostile.compress(hostile.good_members(3) + hostile.TAR_END, "gz"))
    assert len(report.entries) == 6 and len(calls) == 6


# --- skipped entries and caps --------------------------------------------------------------


def test_a_zero_run_in_a_skipped_tar_entry_is_refused_unread(ingest):
    err = refused(ingest(hostile.skipped_zeros(2**30)), ErrorCode.DATASET_LIMIT)
    assert "MAX_COMPRESSION_RATIO" in err.detail


def test_skipped_tar_entries_count_toward_the_total_bytes_cap(ingest):
    data = (
        hostile.good_members(3) + hostile.tar_member(b"notes.txt", bytes(20_000)) + hostile.TAR_END
    )
    err = refused(ingest(data, max_total_bytes=15_000), ErrorCode.DATASET_LIMIT)
    assert "MAX_DATASET_BYTES" in err.detail
    assert len(ingest(data, max_total_bytes=60_000).entries) == 6


def test_a_large_skipped_entry_in_a_plain_tar_is_seeked_past_not_read(ingest):
    data = hostile.good_members(2) + hostile.tar_member(b"video.mp4", bytes(40 * 2**20))
    report = ingest(data + hostile.TAR_END)
    assert report.skipped == [{"path": "video.mp4", "reason": "not an image file (by extension)"}]


def test_a_zero_run_in_a_skipped_zip_member_is_never_read(ingest):
    data = hostile.zip_of(
        [*hostile.good_files(), ("notes.txt", bytes(64 * 2**20))],
        compression=zipfile.ZIP_DEFLATED,
    )
    report = ingest(data)
    assert report.classes == ["a", "b"] and report.skipped[0]["path"] == "notes.txt"


def test_the_entry_cap_holds_for_tars(ingest):
    data = hostile.good_members(3) + hostile.TAR_END
    refused(ingest(data, max_entries=4), ErrorCode.DATASET_LIMIT)


# --- manifests -----------------------------------------------------------------------------


def test_a_manifest_bomb_is_refused_before_it_is_inflated(ingest):
    data = hostile.manifest_bomb(2_400_000)
    assert len(data) < 100_000
    err = refused(ingest(data), ErrorCode.DATASET_LIMIT)
    assert "labels.csv" in err.detail


def test_a_manifest_over_the_byte_cap_is_refused_however_it_is_packed(ingest):
    rows = "path,label\n" + "".join(f"x/{i:09d}.png,a\n" for i in range(MAX_MANIFEST_BYTES // 16))
    data = hostile.zip_of([*hostile.good_files(), ("labels.csv", rows.encode())])
    err = refused(ingest(data), ErrorCode.DATASET_LIMIT)
    assert "16 MiB" in err.detail


def test_a_manifest_with_more_rows_than_entries_allowed_is_refused(ingest):
    rows = "path,label\n" + "".join(f"{c}/{i}.png,{c}\n" for c in "ab" for i in range(20))
    data = hostile.zip_of([*hostile.good_files(), ("labels.csv", rows.encode())])
    err = refused(ingest(data, max_entries=30), ErrorCode.DATASET_LIMIT)
    assert "more than 30 rows" in err.detail


def test_a_manifest_in_a_tar_is_read_once_from_the_stream(ingest):
    rows = b"path,label\n" + b"".join(f"{c}/{i}.png,{c}\n".encode() for c in "ab" for i in range(2))
    members = hostile.good_members() + hostile.tar_member(b"labels.csv", rows) + hostile.TAR_END
    report = ingest(hostile.compress(members, "gz"))
    assert report.layout == "manifest" and report.class_counts == {"a": 2, "b": 2}


def test_manifest_rows_stream_with_bounded_memory():
    rows = b"path,label,split\n" + b"img/1.png,cat,train\n" * 50_000  # 1 MB of text

    def count() -> int:
        return sum(1 for _ in read_manifest_rows(io.BytesIO(rows), "m.csv", Limits()))

    assert bounded(count, seconds=10, peak_mb=1) == 50_000


def test_a_corrupt_manifest_member_is_a_layout_error_not_a_500(ingest):
    rows = "path,label\n" + "".join(f"{c}/{i}.png,{c}\n" for c in "ab" for i in range(2)) * 50
    data = hostile.zip_of(
        [*hostile.good_files(), ("labels.csv", rows.encode())], compression=zipfile.ZIP_DEFLATED
    )
    at = data.find(b"labels.csv") + 10 + 20
    refused(ingest(data[:at] + b"\xff" * 32 + data[at + 32 :]), ErrorCode.DATASET_LAYOUT)


# --- names and duplicates ------------------------------------------------------------------


def test_a_non_utf8_tar_name_is_rejected_per_file(ingest):
    report = ingest(hostile.non_utf8_tar())
    assert report.rejected == [
        {"path": "a/caf\ufffd.png", "reason": "file name is not valid UTF-8"}
    ]
    assert report.class_counts == {"a": 2, "b": 2}


def test_a_zip_flagging_a_non_utf8_name_as_utf8_is_refused_whole(ingest):
    err = refused(ingest(hostile.non_utf8_zip()), ErrorCode.DATASET_NOT_ARCHIVE)
    assert "UTF-8" in err.detail


@pytest.mark.parametrize("target", [b"0.png", b"nowhere.png"])
def test_a_symlink_then_a_file_of_the_same_name_ingests_neither(ingest, target):
    report = ingest(hostile.link_then_file(target))
    assert rejected(report, "a/x.png", "link") and rejected(report, "a/x.png", "duplicate")
    assert "a/x.png" not in {e["source"] for e in report.entries}


def test_the_first_of_two_same_named_entries_is_the_one_kept(ingest):
    report = ingest(hostile.duplicate_files())
    kept = next(e for e in report.entries if e["source"] == "a/0.png")
    first = dict(hostile.good_files())["a/0.png"]
    assert kept["sha256"] == hashlib.sha256(first).hexdigest()
    assert rejected(report, "a/0.png", "duplicate path in archive")

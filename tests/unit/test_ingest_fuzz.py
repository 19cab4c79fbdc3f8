"""Property-based test of the archive reader: whatever the archive holds, ingest either
returns a dataset built only from safe entries, or refuses with a ServiceError."""

import io
import tarfile
import zipfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import ServiceError
from service.ingest import Limits, ingest_archive
from tests.helpers import noise_image, png_bytes

SEGMENTS = st.sampled_from(["a", "b", "c", "..", ".", "", ".hidden", "__MACOSX", "x\\y", "C:", "ü"])
NAMES = (
    st.lists(SEGMENTS, min_size=1, max_size=4)
    .map("/".join)
    .flatmap(
        lambda stem: st.sampled_from([".png", ".PNG", ".jpg", ".txt", ".csv", ""]).map(
            lambda ext: stem + ext
        )
    )
)
VALID = png_bytes(noise_image(1, 8))
CONTENTS = st.one_of(st.just(VALID), st.binary(max_size=64), st.just(VALID[:20]))
ENTRIES = st.lists(st.tuples(NAMES, CONTENTS), max_size=12)


def build(entries, kind):
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in entries:
                zf.writestr(name or "_", data)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, data in entries:
                info = tarfile.TarInfo(name or "_")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def check(data: bytes, tmp: Path) -> None:
    out = tmp / "images.zip"
    try:
        report = ingest_archive(io.BytesIO(data), out, Limits(max_pixels=10**6, min_per_class=1))
    except ServiceError as exc:
        assert 400 <= exc.status_code < 500
        return
    for entry in report.entries:
        src = entry["source"]
        assert ".." not in src.split("/") and not src.startswith("/") and "\\" not in src
        assert entry["path"].startswith("images/")
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted(e["path"] for e in report.entries)
    assert len(report.classes) >= 2


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entries=ENTRIES, kind=st.sampled_from(["zip", "tar.gz"]))
def test_any_archive_gives_a_safe_dataset_or_a_4xx(entries, kind, tmp_path):
    check(build(entries, kind), tmp_path)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=2048), cut=st.integers(min_value=0, max_value=4096))
def test_arbitrary_and_truncated_bytes_never_crash_the_reader(data, cut, tmp_path):
    check(data, tmp_path)
    check(build([("a/1.png", VALID), ("b/1.png", VALID), ("b/2.png", data)], "zip")[:cut], tmp_path)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(manifest=st.text(max_size=300), name=st.sampled_from(["labels.csv", "labels.jsonl"]))
def test_any_manifest_text_gives_a_dataset_or_a_4xx(manifest, name, tmp_path):
    entries = [("a/1.png", VALID), ("b/1.png", VALID), (name, manifest.encode())]
    check(build(entries, "zip"), tmp_path)

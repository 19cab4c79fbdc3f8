"""Multi-label manifests: a `labels` column (`a|b` in CSV, a JSON list in JSONL) gives each
image several classes; malformed rows are refused naming their line."""

import io
import json
import tracemalloc
from pathlib import Path

import pytest

from service.errors import ErrorCode, ServiceError
from service.ingest import Limits
from service.ingest.manifest import MAX_LABELS_PER_IMAGE, MAX_MULTILABEL_CLASSES
from service.ingest.manifest_stream import read_manifest, read_manifest_rows
from service.ingest.sources import RawEntry
from tests.helpers import ingest_bytes, jpeg_bytes, make_zip, noise_image

# image -> (classes, split); "cat" 4 images, "dog" 3, "outdoor" 4; two images carry two.
ROWS = {
    "img/0.jpg": (["cat"], "train"),
    "img/1.jpg": (["cat", "outdoor"], "train"),
    "img/2.jpg": (["outdoor", "dog"], "train"),
    "img/3.jpg": (["dog"], "train"),
    "img/4.jpg": (["outdoor"], "train"),
    "img/5.jpg": (["cat", "dog", "outdoor"], "val"),
    "img/6.jpg": (["cat"], "val"),
}
IMAGES = [(p, jpeg_bytes(noise_image(i))) for i, p in enumerate(ROWS)]


def csv_manifest(rows=ROWS) -> tuple[str, bytes]:
    lines = "".join(f"{p},{'|'.join(labels)},{s}\n" for p, (labels, s) in rows.items())
    return "labels.csv", ("path,labels,split\n" + lines).encode()


def jsonl_manifest(rows=ROWS) -> tuple[str, bytes]:
    lines = "".join(
        json.dumps({"path": p, "labels": labels, "split": s}) + "\n"
        for p, (labels, s) in rows.items()
    )
    return "labels.jsonl", lines.encode()


@pytest.fixture()
def ingest(tmp_path):
    def run(data: bytes, **limits):
        return ingest_bytes(data, tmp_path / "out" / "images.zip", **limits)

    return run


def refusal(ingest, manifest: tuple[str, bytes]) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        ingest(make_zip([*IMAGES, manifest]))
    return info.value


@pytest.mark.parametrize("manifest", [csv_manifest, jsonl_manifest])
def test_a_labels_column_makes_a_multi_label_dataset(ingest, manifest):
    report = ingest(make_zip([*IMAGES, manifest()]))
    assert report.task == "multi-label" and report.classes == ["cat", "dog", "outdoor"]
    by_source = {e["source"]: e for e in report.entries}
    assert by_source["img/2.jpg"]["labels"] == [1, 2]  # sorted indices: dog, outdoor
    assert by_source["img/5.jpg"]["labels"] == [0, 1, 2]
    assert by_source["img/4.jpg"]["labels"] == [2]
    assert all(e["label"] == e["labels"][0] for e in report.entries)
    index = report.index()
    assert index["task"] == "multi-label" and index["entries"] == report.entries
    assert report.summary()["task"] == "multi-label"
    # An image counts once for each of its classes.
    assert report.class_counts == {"cat": 4, "dog": 3, "outdoor": 4}
    assert report.details["counts"]["train"] == {"cat": 2, "dog": 2, "outdoor": 3}
    assert report.details["counts"]["val"] == {"cat": 2, "dog": 1, "outdoor": 1}
    assert report.details["label_cardinality"] == pytest.approx(11 / 7, abs=1e-3)


def test_csv_and_jsonl_of_the_same_labels_hash_the_same(ingest, tmp_path):
    a = ingest(make_zip([*IMAGES, csv_manifest()]))
    b = ingest_bytes(make_zip([*IMAGES, jsonl_manifest()]), tmp_path / "b" / "images.zip")
    assert a.content_hash() == b.content_hash()
    relabelled = dict(ROWS, **{"img/0.jpg": (["cat", "dog"], "train")})
    c = ingest_bytes(make_zip([*IMAGES, csv_manifest(relabelled)]), tmp_path / "c" / "i.zip")
    assert c.content_hash() != a.content_hash()


def test_single_label_datasets_say_so_and_carry_no_labels_list(ingest):
    rows = "path,label\n" + "".join(f"img/{i}.jpg,{'ab'[i % 2]}\n" for i in range(4))
    report = ingest(make_zip([*IMAGES[:4], ("labels.csv", rows.encode())]))
    assert report.task == "single-label" and report.index()["task"] == "single-label"
    assert all("labels" not in e for e in report.entries)
    assert report.details["label_cardinality"] == 1.0


def test_a_class_too_small_counts_every_image_that_carries_it(ingest):
    rows = dict(ROWS)
    rows["img/3.jpg"] = (["cat"], "train")  # "dog" keeps one training image (img/2)
    err = refusal(ingest, csv_manifest(rows))
    assert err.code == ErrorCode.DATASET_CLASS_TOO_SMALL and "'dog' has 1" in err.detail


def test_duplicates_describe_a_multi_label_image_by_all_its_classes(ingest):
    copy = ("img/7.jpg", IMAGES[1][1])  # the bytes of img/1 (cat|outdoor), labelled dog
    rows = dict(ROWS, **{"img/7.jpg": (["dog"], "train")})
    report = ingest(make_zip([*IMAGES, copy, csv_manifest(rows)]))
    group = report.details["conflicting_labels"]["examples"][0]
    assert {p["path"]: p["class"] for p in group} == {
        "img/1.jpg": "cat|outdoor",
        "img/7.jpg": "dog",
    }


BAD_CSV = [
    ("img/1.jpg,,train", "line 3: no labels", "cat|outdoor"),
    ("img/1.jpg,cat||dog,train", "line 3: an empty label", "cat|outdoor"),
    ("img/1.jpg, | ,train", "line 3: an empty label", "cat|outdoor"),
    ("img/1.jpg,cat|dog|cat,train", "line 3: label 'cat' is listed more than once", ""),
    (
        "img/1.jpg," + "|".join(f"c{i}" for i in range(MAX_LABELS_PER_IMAGE + 1)) + ",train",
        f"line 3: {MAX_LABELS_PER_IMAGE + 1} labels, more than {MAX_LABELS_PER_IMAGE}",
        "",
    ),
]


@pytest.mark.parametrize(("row", "says", "accepted"), BAD_CSV)
def test_a_malformed_csv_labels_cell_is_refused_naming_its_line(ingest, row, says, accepted):
    text = f"path,labels,split\nimg/0.jpg,cat,train\n{row}\n"
    err = refusal(ingest, ("labels.csv", text.encode()))
    assert err.code == ErrorCode.DATASET_LAYOUT and err.status_code == 422
    assert "labels.csv " + says in err.detail and accepted in err.detail


BAD_JSONL = [
    ('"cat|outdoor"', 'line 2: labels is "cat|outdoor", not a list'),
    ("null", "line 2: labels is null, not a list"),
    ('[1, "cat"]', "line 2: labels holds 1, not a string"),
    ('["cat", null]', "line 2: labels holds null, not a string"),
    ("[]", "line 2: no labels"),
    ('["cat", "  "]', "line 2: an empty label"),
    ('["dog", "dog"]', "line 2: label 'dog' is listed more than once"),
]


@pytest.mark.parametrize(("labels", "says"), BAD_JSONL)
def test_a_malformed_jsonl_labels_list_is_refused_naming_its_line(ingest, labels, says):
    text = (
        '{"path": "img/0.jpg", "labels": ["cat"]}\n'
        + f'{{"path": "img/1.jpg", "labels": {labels}}}\n'
    )
    err = refusal(ingest, ("labels.jsonl", text.encode()))
    assert err.code == ErrorCode.DATASET_LAYOUT and err.status_code == 422
    assert "labels.jsonl " + says in err.detail
    assert '"labels": ["cat", "outdoor"]' in err.detail or "more than once" in says


def test_a_label_column_beside_a_labels_column_is_refused(ingest):
    err = refusal(ingest, ("labels.csv", b"path,label,labels\nimg/0.jpg,cat,cat|dog\n"))
    assert err.code == ErrorCode.DATASET_LAYOUT
    assert "both a 'label' and a 'labels' column" in err.detail


def test_a_jsonl_row_with_both_kinds_of_label_is_refused_naming_its_line(ingest):
    text = (
        '{"path": "img/0.jpg", "labels": ["cat"]}\n\n'
        '{"path": "img/1.jpg", "labels": ["cat"], "class": "dog"}\n'
    )
    err = refusal(ingest, ("labels.jsonl", text.encode()))
    assert err.code == ErrorCode.DATASET_LAYOUT and "labels.jsonl line 3: has both" in err.detail


def test_more_classes_than_the_cap_is_refused_at_the_row_that_passes_it():
    rows = "path,labels\n" + "".join(
        f"x/{i}.png,k{2 * i}|k{2 * i + 1}\n" for i in range(MAX_MULTILABEL_CLASSES)
    )
    with pytest.raises(ServiceError) as info:
        list(read_manifest_rows(io.BytesIO(rows.encode()), "m.csv", Limits()))
    line = MAX_MULTILABEL_CLASSES // 2 + 2  # the header, then two new classes a row
    assert info.value.code == ErrorCode.DATASET_LIMIT and info.value.status_code == 413
    assert f"m.csv line {line}: more than {MAX_MULTILABEL_CLASSES} classes" in info.value.detail


def test_multi_label_rows_stream_with_bounded_memory():
    rows = b"path,labels,split\n" + b"img/1.png,cat|dog|outdoor,train\n" * 50_000
    tracemalloc.start()
    try:
        n = sum(1 for _ in read_manifest_rows(io.BytesIO(rows), "m.csv", Limits()))
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert n == 50_000 and peak < 1


def test_rows_with_the_same_classes_share_one_label_tuple(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        "".join(json.dumps({"path": f"{i}.png", "labels": ["b", "a"]}) + "\n" for i in range(3))
    )
    entry = RawEntry("m.jsonl", "file", path.stat().st_size, None, lambda: path.open("rb"))
    places = read_manifest(entry, Limits())
    assert places["0.png"] == (("a", "b"), None)
    assert places["0.png"] is places["1.png"] is places["2.png"]

"""Ingest on its own: formats, layouts, hostile archives, duplicates and leakage."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.errors import ErrorCode, ServiceError
from service.ingest import Limits, ingest_archive
from tests.helpers import (
    imagefolder_zip,
    ingest_bytes,
    jpeg_bytes,
    make_zip,
    noise_image,
    png_bytes,
)


def ab_files(n=2, prefix=""):
    return [
        (f"{prefix}{c}/{i}.png", png_bytes(noise_image(i + 10 * j)))
        for j, c in enumerate("ab")
        for i in range(n)
    ]


def make_tar(files, mode="w", links=(), devices=()):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
        for name in devices:
            info = tarfile.TarInfo(name)
            info.type = tarfile.CHRTYPE
            tf.addfile(info)
    return buf.getvalue()


@pytest.fixture()
def ingest(tmp_path):
    def run(data: bytes, **limits):
        return ingest_bytes(data, tmp_path / "out" / "images.zip", **limits)

    return run


def error_of(ingest, data: bytes, **kw) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        ingest(data, **kw)
    return info.value


# --- formats and layouts ---------------------------------------------------------------


def test_imagefolder_zip_lists_classes_and_counts(ingest):
    report = ingest(imagefolder_zip({"cat": 3, "dog": 2}))
    assert report.classes == ["cat", "dog"] and report.layout == "imagefolder"
    assert report.class_counts == {"cat": 3, "dog": 2}
    assert [e["label"] for e in report.entries] == [0, 0, 0, 1, 1]
    assert all(len(e["sha256"]) == 64 and e["w"] == 16 for e in report.entries)


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_and_tar_gz_are_read_like_zip(ingest, mode):
    report = ingest(make_tar(ab_files(3), mode=mode))
    assert report.format == "tar" and report.class_counts == {"a": 3, "b": 3}


def test_canonical_zip_holds_exactly_the_accepted_bytes(ingest, tmp_path):
    files = ab_files(2) + [("a/broken.png", b"nope")]
    report = ingest(make_zip(files))
    with zipfile.ZipFile(tmp_path / "out" / "images.zip") as zf:
        assert sorted(zf.namelist()) == sorted(e["path"] for e in report.entries)
        originals = dict(files)
        for e in report.entries:
            assert zf.read(e["path"]) == originals[e["source"]]
            assert zf.getinfo(e["path"]).compress_type == zipfile.ZIP_STORED


def test_single_wrapping_folder_is_not_taken_for_a_class(ingest):
    report = ingest(imagefolder_zip({"cat": 2, "dog": 2}, prefix="pets/"))
    assert report.classes == ["cat", "dog"]


def test_train_val_test_folders_give_splits(ingest):
    files = []
    for split, n in (("train", 3), ("validation", 2), ("test", 1)):
        files += [
            (f"ds/{split}/{c}/{i}.png", png_bytes(noise_image(hash((split, c, i)) % 10**6)))
            for c in "xy"
            for i in range(n)
        ]
    report = ingest(make_zip(files))
    assert report.layout == "splits" and report.splits == ["test", "train", "val"]
    assert report.details["counts"] == {
        "test": {"x": 1, "y": 1},
        "train": {"x": 3, "y": 3},
        "val": {"x": 2, "y": 2},
    }


def test_a_class_named_test_is_still_a_class_without_a_train_folder(ingest):
    report = ingest(
        make_zip(
            ab_files(2) + [(f"test/{i}.png", png_bytes(noise_image(90 + i))) for i in range(2)]
        )
    )
    assert report.layout == "imagefolder" and report.classes == ["a", "b", "test"]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_manifest_beside_the_images_gives_labels_and_splits(ingest, kind):
    imgs = [(f"img/{i}.jpg", jpeg_bytes(noise_image(i))) for i in range(6)]
    rows = [
        (f"img/{i}.jpg", "odd" if i % 2 else "even", "test" if i == 5 else "train")
        for i in range(6)
    ]
    if kind == "csv":
        manifest = (
            "labels.csv",
            ("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows)).encode(),
        )
    else:
        manifest = (
            "labels.jsonl",
            "".join(
                json.dumps({"file": p, "class": lab, "split": s}) + "\n" for p, lab, s in rows
            ).encode(),
        )
    extra = ("img/unlisted.jpg", jpeg_bytes(noise_image(77)))
    report = ingest(make_zip([*imgs, manifest, extra]))
    assert report.layout == "manifest" and report.classes == ["even", "odd"]
    assert {e["source"]: e["split"] for e in report.entries}["img/5.jpg"] == "test"
    assert report.skipped == [{"path": "img/unlisted.jpg", "reason": "not listed in the manifest"}]


def test_a_manifest_without_the_needed_columns_names_them(ingest):
    err = error_of(ingest, make_zip(ab_files() + [("labels.csv", b"name,kind\na.png,x\n")]))
    assert err.code == ErrorCode.DATASET_LAYOUT and "label column" in err.detail


def test_manifest_entries_missing_from_the_archive_are_listed(ingest):
    rows = (
        "path,label\n"
        + "".join(f"{c}/{i}.png,{c}\n" for c in "ab" for i in range(2))
        + "ghost.png,a\n"
    )
    report = ingest(make_zip(ab_files() + [("labels.csv", rows.encode())]))
    assert {
        "path": "ghost.png",
        "reason": "listed in the manifest but not in the archive",
    } in report.rejected


def test_a_manifest_in_a_subfolder_labels_only_the_images_under_it(ingest):
    """Paths in `sub/labels.csv` are relative to `sub/`: `other/b0.png` is not `sub/r/b0.png`."""
    rows = "path,label\n" + "".join(f"r/{c}{i}.png,{c}\n" for c in "ab" for i in range(2))
    files = [
        (f"sub/r/{c}{i}.png", png_bytes(noise_image(200 + 3 * i + ord(c))))
        for c in "ab"
        for i in range(2)
    ]
    decoy = ("other/b0.png", png_bytes(noise_image(999)))
    report = ingest(make_zip([*files, ("sub/labels.csv", rows.encode()), decoy]))
    assert sorted(e["source"] for e in report.entries) == [p for p, _ in sorted(files)]
    assert {"path": "other/b0.png", "reason": "not listed in the manifest"} in report.skipped
    assert not [r for r in report.rejected if "listed in the manifest" in r["reason"]]


# --- image formats and modes -----------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_every_accepted_format_and_colour_mode_is_read(ingest):
    rgb = Image.fromarray(noise_image(1, 24))
    gif = io.BytesIO()
    rgb.convert("P").save(
        gif, format="GIF", save_all=True, append_images=[rgb.convert("P").rotate(90)]
    )
    files = [
        ("a/rgb.jpg", encode(rgb, "JPEG")),
        ("a/cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG")),
        ("a/gray.png", encode(rgb.convert("L"), "PNG")),
        ("a/alpha.png", encode(rgb.convert("RGBA"), "PNG")),
        ("b/palette.bmp", encode(rgb.convert("P"), "BMP")),
        ("b/anim.gif", gif.getvalue()),
        ("b/pic.webp", encode(rgb, "WEBP")),
        ("b/pic.TIFF", encode(rgb, "TIFF")),
    ]
    report = ingest(make_zip(files))
    assert report.rejected == [] and len(report.entries) == 8
    assert {e["format"] for e in report.entries} == {"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"}


def test_exif_orientation_is_applied_to_the_recorded_size(ingest):
    img = Image.fromarray(noise_image(3, 32)[:20])  # 32 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown 20 wide, 32 high
    files = ab_files() + [("a/rotated.jpg", encode(img, "JPEG", exif=exif))]
    rotated = next(e for e in ingest(make_zip(files)).entries if e["source"] == "a/rotated.jpg")
    assert (rotated["w"], rotated["h"]) == (20, 32)


def test_training_and_prediction_convert_colour_modes_the_same_way():
    from worker.training.data import to_rgb

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # composited on white
    assert to_rgb(Image.new("L", (2, 2), 128)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).mode == "RGB"


# --- hostile archives ------------------------------------------------------------------


def test_hidden_and_system_entries_are_ignored_silently(ingest):
    files = ab_files() + [
        (".ipynb_checkpoints/x/1.png", png_bytes(noise_image(5))),
        ("__MACOSX/a/._1.png", b"junk"),
        ("a/.DS_Store", b"junk"),
        ("b/.hidden.png", b"junk"),
        ("b/Thumbs.db", b"junk"),
    ]
    report = ingest(make_zip(files))
    assert report.classes == ["a", "b"] and report.rejected == [] and report.skipped == []


def test_non_image_files_are_listed_as_skipped(ingest):
    report = ingest(make_zip(ab_files() + [("a/notes.txt", b"hello")]))
    assert report.skipped == [{"path": "a/notes.txt", "reason": "not an image file (by extension)"}]


def test_undecodable_and_truncated_files_are_rejected_one_by_one(ingest):
    files = ab_files() + [
        ("a/broken.png", b"\x89PNG\r\n\x1a\n not really"),
        ("b/truncated.jpg", jpeg_bytes(noise_image(99))[:60]),
    ]
    report = ingest(make_zip(files))
    assert report.class_counts == {"a": 2, "b": 2}
    reasons = {r["path"]: r["reason"] for r in report.rejected}
    assert set(reasons) == {"a/broken.png", "b/truncated.jpg"}


def test_a_dataset_of_only_broken_images_is_refused_naming_the_problem(ingest):
    err = error_of(ingest, make_zip([("a/1.png", b"nope"), ("b/1.png", b"nope")]))
    assert err.code == ErrorCode.DATASET_NO_VALID_IMAGES and "a/1.png" in err.detail
    assert len(err.extra["rejected"]) == 2


def test_not_an_archive_is_refused_naming_what_is_accepted(ingest):
    err = error_of(ingest, b"this is plain text, not an archive")
    assert err.code == ErrorCode.DATASET_NOT_ARCHIVE and err.status_code == 415
    assert ".tar.gz" in err.detail and ".zip" in err.detail


def test_empty_zip_is_refused(ingest):
    err = error_of(ingest, make_zip([]))
    assert err.code == ErrorCode.DATASET_EMPTY and err.status_code == 422


def test_single_class_is_refused_naming_it(ingest):
    err = error_of(ingest, imagefolder_zip({"only": 4}))
    assert err.code == ErrorCode.DATASET_TOO_FEW_CLASSES and "'only'" in err.detail


def test_class_with_one_image_is_refused_naming_it(ingest):
    err = error_of(ingest, imagefolder_zip({"many": 4, "lonely": 1}))
    assert err.code == ErrorCode.DATASET_CLASS_TOO_SMALL and "'lonely' has 1" in err.detail


def test_an_empty_class_folder_is_not_a_class(ingest):
    data = make_zip(ab_files())
    buf = io.BytesIO(data)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("empty/", b"")
    assert ingest(buf.getvalue()).classes == ["a", "b"]


def test_images_outside_class_folders_are_rejected(ingest):
    report = ingest(make_zip([("loose.png", png_bytes(noise_image(0)))] + ab_files()))
    assert report.rejected == [
        {"path": "loose.png", "reason": "image is not inside a class folder"}
    ]


@pytest.mark.parametrize("container", ["zip", "tar"])
def test_path_traversal_and_absolute_entries_are_rejected_not_read(ingest, container):
    evil = [
        ("../evil/1.png", png_bytes(noise_image(50))),
        ("/abs/1.png", png_bytes(noise_image(51))),
        ("a\\..\\win.png", png_bytes(noise_image(52))),
    ]
    data = make_zip(ab_files() + evil) if container == "zip" else make_tar(ab_files() + evil)
    reasons = {r["path"]: r["reason"] for r in ingest(data).rejected}
    assert "escapes" in reasons["../evil/1.png"] and "backslash" in reasons["a\\..\\win.png"]
    assert reasons["/abs/1.png"] == "absolute path"


def test_symlinks_and_devices_are_rejected(ingest):
    data = make_tar(ab_files(), links=[("a/link.png", "/etc/passwd")], devices=["b/dev.png"])
    reasons = {r["path"]: r["reason"] for r in ingest(data).rejected}
    assert "link" in reasons["a/link.png"] and "device" in reasons["b/dev.png"]


def test_zip_symlink_entries_are_rejected(ingest):
    buf = io.BytesIO(make_zip(ab_files()))
    with zipfile.ZipFile(buf, "a") as zf:
        info = zipfile.ZipInfo("a/link.png")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    assert {"path": "a/link.png", "reason": "symbolic or hard link"} in ingest(
        buf.getvalue()
    ).rejected


def test_a_bomb_by_ratio_is_refused_before_its_bytes_are_written(ingest, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in ab_files():
            zf.writestr(name, data)
        zf.writestr("a/bomb.bmp", b"BM" + b"\0" * 20_000_000)
    report = ingest(buf.getvalue(), max_compression_ratio=50)
    bombs = [r["path"] for r in report.rejected if "compression ratio" in r["reason"]]
    assert bombs == ["a/bomb.bmp"]
    assert report.class_counts == {"a": 2, "b": 2}
    with zipfile.ZipFile(tmp_path / "out" / "images.zip") as zf:
        assert all(i.file_size < 10_000 for i in zf.infolist())


def test_a_bomb_by_pixel_count_is_rejected(ingest):
    big = png_bytes(np.zeros((3000, 3000, 3), dtype=np.uint8))
    report = ingest(make_zip(ab_files() + [("a/huge.png", big)]), max_pixels=1_000_000)
    assert (
        "over the limit of 1000000"
        in {r["path"]: r["reason"] for r in report.rejected}["a/huge.png"]
    )


def test_caps_on_entries_and_total_bytes_stop_the_upload(ingest):
    assert error_of(ingest, make_zip(ab_files(3)), max_entries=4).code == ErrorCode.DATASET_LIMIT
    err = error_of(ingest, make_zip(ab_files(3)), max_total_bytes=2000)
    assert err.code == ErrorCode.DATASET_LIMIT and "MAX_DATASET_BYTES" in err.detail


def test_duplicate_names_in_one_archive_are_read_once(ingest):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in ab_files():
            zf.writestr(name, data)
        with pytest.warns(UserWarning):
            zf.writestr("a/0.png", png_bytes(noise_image(1234)))
    report = ingest(buf.getvalue())
    assert [e["source"] for e in report.entries].count("a/0.png") == 1


def test_mixed_case_extensions_are_images(ingest):
    files = [
        ("a/1.PNG", png_bytes(noise_image(1))),
        ("a/2.JpEg", jpeg_bytes(noise_image(2))),
        ("b/1.Png", png_bytes(noise_image(3))),
        ("b/2.WEBP", encode(Image.fromarray(noise_image(4)), "WEBP")),
    ]
    assert ingest(make_zip(files)).class_counts == {"a": 2, "b": 2}


def test_nothing_is_written_outside_the_output_zip(tmp_path):
    evil = [
        ("../../escape.png", png_bytes(noise_image(1))),
        ("/tmp/abs.png", png_bytes(noise_image(2))),
    ]
    out = tmp_path / "work" / "images.zip"
    ingest_archive(io.BytesIO(make_zip(ab_files() + evil)), out, Limits(max_pixels=10**6))
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert written == ["work", "work/images.zip"]
    assert not Path("/tmp/abs.png").exists()


# --- duplicates and leakage ------------------------------------------------------------


def test_exact_and_near_duplicates_leakage_and_conflicting_labels_are_reported(ingest):
    base = noise_image(7, 64)
    near = base.copy()
    near[0, 0] = 255 - near[0, 0]  # one pixel differs: different bytes, same picture
    files = [
        ("train/a/1.png", png_bytes(base)),
        ("train/a/2.png", png_bytes(noise_image(8))),
        ("train/b/1.png", png_bytes(noise_image(9))),
        ("train/b/2.png", png_bytes(noise_image(10))),
        ("val/a/dup.png", png_bytes(base)),  # exact copy across splits: leakage
        ("val/b/near.png", png_bytes(near)),  # near copy with another label
        ("train/b/copy.png", png_bytes(noise_image(8))),  # same bytes as a/2 with label b
    ]
    details = ingest(make_zip(files)).details
    assert details["duplicates"]["exact_groups"] == 2
    assert details["leakage"]["groups"] >= 1 and "optimistic" in details["leakage"]["detail"]
    leaked = {p["path"] for g in details["leakage"]["examples"] for p in g}
    assert {"train/a/1.png", "val/a/dup.png"} <= leaked
    assert details["duplicates"]["near_groups"] == 1
    assert {p["path"] for p in details["duplicates"]["near"][0]} >= {"val/b/near.png"}
    conflicting = {p["path"] for g in details["conflicting_labels"]["examples"] for p in g}
    assert conflicting == {"train/a/2.png", "train/b/copy.png"}
    assert details["imbalance_ratio"] == pytest.approx(4 / 3, abs=1e-3)

import io

import pytest

from service.errors import ErrorCode, ServiceError
from service.ingest import ingest_zip
from tests.helpers import imagefolder_zip, jpeg_bytes, make_zip, noise_image, png_bytes


def ingest(data: bytes, min_per_class: int = 2):
    return ingest_zip(io.BytesIO(data), max_pixels=10_000_000, min_per_class=min_per_class)


def error_of(data: bytes, **kw) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        ingest(data, **kw)
    return info.value


def test_imagefolder_zip_lists_classes_and_counts():
    report = ingest(imagefolder_zip({"cat": 3, "dog": 2}))
    assert report.classes == ["cat", "dog"]
    assert report.class_counts == {"cat": 3, "dog": 2}
    assert [e.label for e in report.entries] == [0, 0, 0, 1, 1]
    assert all(len(e.sha256) == 64 and e.width == 16 for e in report.entries)


def test_single_wrapping_folder_is_not_taken_for_a_class():
    report = ingest(imagefolder_zip({"cat": 2, "dog": 2}, prefix="pets/"))
    assert report.classes == ["cat", "dog"]


def test_hidden_and_system_entries_are_ignored_silently():
    files = [
        ("a/1.png", png_bytes(noise_image(1))),
        ("a/2.jpg", jpeg_bytes(noise_image(2))),
        ("b/1.PNG", png_bytes(noise_image(3))),
        ("b/2.png", png_bytes(noise_image(4))),
        (".ipynb_checkpoints/x/1.png", png_bytes(noise_image(5))),
        ("__MACOSX/a/._1.png", b"junk"),
        ("a/.DS_Store", b"junk"),
        ("b/.hidden.png", b"junk"),
    ]
    report = ingest(make_zip(files))
    assert report.classes == ["a", "b"]
    assert report.rejected == [] and report.skipped == []


def test_non_image_files_are_listed_as_skipped():
    files = [
        (f"{c}/{i}.png", png_bytes(noise_image(i + 10 * j)))
        for j, c in enumerate("ab")
        for i in range(2)
    ]
    files.append(("a/notes.txt", b"hello"))
    report = ingest(make_zip(files))
    assert report.skipped == [{"path": "a/notes.txt", "reason": "not an image file (by extension)"}]


def test_undecodable_files_are_rejected_one_by_one_with_reasons():
    files = [
        (f"{c}/{i}.png", png_bytes(noise_image(i + 10 * j)))
        for j, c in enumerate("ab")
        for i in range(2)
    ]
    files.append(("a/broken.png", b"\x89PNG\r\n\x1a\n not really"))
    files.append(("b/truncated.jpg", jpeg_bytes(noise_image(99))[:60]))
    report = ingest(make_zip(files))
    assert report.class_counts == {"a": 2, "b": 2}
    reasons = {r["path"]: r["reason"] for r in report.rejected}
    assert set(reasons) == {"a/broken.png", "b/truncated.jpg"}
    assert all(reasons.values())


def test_a_dataset_of_only_broken_images_is_refused_naming_the_problem():
    err = error_of(make_zip([("a/1.png", b"nope"), ("b/1.png", b"nope")]))
    assert err.code == ErrorCode.DATASET_NO_VALID_IMAGES
    assert "a/1.png" in err.detail
    assert len(err.extra["rejected"]) == 2


def test_not_a_zip_is_refused():
    err = error_of(b"this is plain text, not an archive")
    assert err.code == ErrorCode.DATASET_NOT_ZIP and err.status_code == 415


def test_empty_zip_is_refused():
    err = error_of(make_zip([]))
    assert err.code == ErrorCode.DATASET_EMPTY and err.status_code == 422


def test_single_class_is_refused_naming_it():
    err = error_of(imagefolder_zip({"only": 4}))
    assert err.code == ErrorCode.DATASET_TOO_FEW_CLASSES
    assert "'only'" in err.detail


def test_class_with_one_image_is_refused_naming_it():
    err = error_of(imagefolder_zip({"many": 4, "lonely": 1}))
    assert err.code == ErrorCode.DATASET_CLASS_TOO_SMALL
    assert "'lonely' has 1" in err.detail


def test_images_outside_class_folders_are_rejected():
    data = make_zip(
        [("loose.png", png_bytes(noise_image(0)))]
        + [
            (f"{c}/{i}.png", png_bytes(noise_image(i + 5 * j)))
            for j, c in enumerate("ab")
            for i in range(2)
        ]
    )
    report = ingest(data)
    assert report.rejected == [
        {"path": "loose.png", "reason": "image is not inside a class folder"}
    ]


def test_path_traversal_entries_are_rejected_not_read():
    files = [
        (f"{c}/{i}.png", png_bytes(noise_image(i + 5 * j)))
        for j, c in enumerate("ab")
        for i in range(2)
    ]
    files += [
        ("../evil/1.png", png_bytes(noise_image(50))),
        ("/abs/1.png", png_bytes(noise_image(51))),
    ]
    report = ingest(make_zip(files))
    reasons = {r["path"]: r["reason"] for r in report.rejected}
    assert "escapes" in reasons["../evil/1.png"]
    assert reasons["/abs/1.png"] == "absolute path"


def test_pixel_cap_rejects_oversized_images():
    files = [
        (f"{c}/{i}.png", png_bytes(noise_image(i + 5 * j, size=64)))
        for j, c in enumerate("ab")
        for i in range(2)
    ]
    with pytest.raises(ServiceError) as info:
        ingest_zip(io.BytesIO(make_zip(files)), max_pixels=1000, min_per_class=2)
    assert "over the limit of 1000" in info.value.extra["rejected"][0]["reason"]

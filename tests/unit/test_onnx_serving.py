"""Serving without torch: the README's onnxruntime snippet and the API's predictor give the
same answer as each other, on a small ONNX graph built here (no training, no export)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from core import imaging
from core.inference import Predictors
from core.storage import LocalObjectStore

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["cat", "dog", "fox"]


def tiny_model(path: Path, multilabel: bool = False) -> None:
    """input N x 3 x H x W -> global average pool -> flatten -> x W + b -> logits."""
    rng = np.random.default_rng(0)
    weights = helper.make_tensor("W", TensorProto.FLOAT, [3, 3], rng.normal(size=9) * 4)
    bias = helper.make_tensor("B", TensorProto.FLOAT, [3], rng.normal(size=3))
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def metadata(multilabel: bool = False) -> dict:
    meta = {
        "task": "multi-label" if multilabel else "single-label",
        "class_names": CLASSES,
        "backbone": "tiny",
        "input_size": [3, 32, 32],
        "resize_size": 37,
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    if multilabel:
        meta["thresholds"] = [0.5, 0.3, 0.7]
    return meta


def images(tmp: Path) -> list[Path]:
    """Odd, non-square sizes and modes: the crops' rounding is where copies go wrong."""
    rng = np.random.default_rng(1)
    out = []
    for name, shape, mode in [("cat.jpg", (45, 61, 3), "RGB"), ("dog.png", (83, 50), "L")]:
        arr = rng.integers(0, 255, shape, dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(tmp / name)
        out.append(tmp / name)
    return out


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("With onnxruntime and numpy alone")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.parametrize("multilabel, tta", [(False, False), (True, False), (False, True)])
def test_the_readme_snippet_answers_what_the_api_answers(tmp_path, monkeypatch, multilabel, tta):
    (tmp_path / "model").mkdir()
    tiny_model(tmp_path / "model" / "model.onnx")
    meta = {**metadata(multilabel), **({"tta": "hflip"} if tta else {})}
    (tmp_path / "model" / "metadata.json").write_text(json.dumps(meta))
    paths = images(tmp_path)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(readme_snippet(), {})  # noqa: S102 - our own README
    said = eval(printed.getvalue())  # noqa: S307 - what the snippet printed

    store = LocalObjectStore(tmp_path / "store")
    store.put_file("m/model.onnx", tmp_path / "model" / "model.onnx")
    store.put_file("m/metadata.json", tmp_path / "model" / "metadata.json")
    predictor = Predictors(2).get(store, "m/model.onnx", "m/metadata.json")
    decoded = [imaging.decode_upload(p.read_bytes(), 10**6) for p in paths]
    answers = predictor.predict(decoded, top_k=3)
    if multilabel:
        assert said == [a["labels"] for a in answers]
        assert all(set(a["scores"]) == set(CLASSES) for a in answers)
    else:
        for (label, probability), answer in zip(said, answers, strict=True):
            assert answer["top"][0]["label"] == label
            assert answer["top"][0]["probability"] == pytest.approx(probability, abs=1e-6)
            assert sum(t["probability"] for t in answer["top"]) == pytest.approx(1.0)


def test_the_predictor_cache_is_bounded_and_reuses_sessions(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    tiny_model(tmp_path / "model.onnx")
    for i in range(3):
        store.put_file(f"m{i}/model.onnx", tmp_path / "model.onnx")
        store.put_bytes(f"m{i}/metadata.json", json.dumps(metadata()).encode())
    cache = Predictors(2)
    first = cache.get(store, "m0/model.onnx", "m0/metadata.json")
    assert cache.get(store, "m0/model.onnx", "m0/metadata.json") is first
    cache.get(store, "m1/model.onnx", "m1/metadata.json")
    cache.get(store, "m2/model.onnx", "m2/metadata.json")  # evicts m0, the least recent
    assert len(cache) == 2
    assert cache.get(store, "m0/model.onnx", "m0/metadata.json") is not first


@pytest.mark.parametrize("spin", [False, True])
def test_predict_spin_sets_whether_onnxruntime_threads_busy_wait(tmp_path, spin):
    store = LocalObjectStore(tmp_path / "store")
    tiny_model(tmp_path / "model.onnx")
    store.put_file("m/model.onnx", tmp_path / "model.onnx")
    store.put_bytes("m/metadata.json", json.dumps(metadata()).encode())
    predictor = Predictors(1, threads=2, spin=spin).get(store, "m/model.onnx", "m/metadata.json")
    options = predictor.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spin))
    assert options.intra_op_num_threads == 2


def test_decode_upload_refuses_what_ingest_refuses():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "PNG")
    good = buf.getvalue()
    assert imaging.decode_upload(good, 10**6).size == (40, 30)
    with pytest.raises(ValueError, match="over the limit"):
        imaging.decode_upload(good, 1000)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        imaging.decode_upload(good[:50], 10**6)
    with pytest.raises(ValueError, match="not a readable image"):
        imaging.decode_upload(b"%PDF-1.4 not an image", 10**6)
    with pytest.raises(ValueError, match="empty"):
        imaging.decode_upload(b"", 10**6)


def test_flip_test_time_augmentation_averages_the_image_and_its_mirror(tmp_path):
    """A model whose metadata asks for `"tta": "hflip"` answers the mean of both views."""
    store = LocalObjectStore(tmp_path / "store")
    # Left and right matter to this one: flatten the whole image into a linear layer.
    rng = np.random.default_rng(0)
    weights = helper.make_tensor("W", TensorProto.FLOAT, [3 * 32 * 32, 3], rng.normal(size=9216))
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "sided",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "model.onnx"))
    store.put_file("m/model.onnx", tmp_path / "model.onnx")
    store.put_bytes("m/metadata.json", json.dumps(metadata()).encode())
    store.put_file("t/model.onnx", tmp_path / "model.onnx")
    store.put_bytes("t/metadata.json", json.dumps({**metadata(), "tta": "hflip"}).encode())
    plain = Predictors(2).get(store, "m/model.onnx", "m/metadata.json")
    tta = Predictors(2).get(store, "t/model.onnx", "t/metadata.json")
    batch = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    mirrored = np.ascontiguousarray(batch[..., ::-1])
    expected = (plain.logits(batch) + plain.logits(mirrored)) / 2
    assert not np.allclose(plain.logits(batch), plain.logits(mirrored), atol=1e-3)
    np.testing.assert_allclose(tta.logits(batch), expected, atol=1e-4)


def test_normalize_is_bit_identical_to_the_float32_formula():
    """The lookup table gives exactly `(x / 255 - mean) / std` in float32, as training's
    ToTensor + Normalize compute it, for every crop of a batch."""
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (29, 29, 3), dtype=np.uint8) for _ in range(3)]
    meta = metadata()
    mean = np.asarray(meta["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(meta["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    batch = np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    out = imaging.normalize(crops, meta)
    assert out.dtype == np.float32 and out.shape == (3, 3, 29, 29) and out.flags.c_contiguous
    assert np.array_equal(out, (batch - mean) / std)
    other = imaging.normalize(crops[:1], {**meta, "mean": [0.5] * 3, "std": [0.25] * 3})
    assert np.array_equal(other[0, 1], (crops[0][..., 1].astype(np.float32) / 255 - 0.5) / 0.25)


class _File:
    def __init__(self, name: str) -> None:
        self.filename = name


def test_a_requests_images_decode_on_two_threads_and_the_first_bad_one_in_order_is_the_error(
    monkeypatch,
):
    import threading

    from core.errors import ServiceError
    from core.settings import Settings
    from service.routes import predict

    threads, calls = set(), []
    both, fast_failed = threading.Event(), threading.Event()

    def crop(i, upload, model, settings):
        calls.append(i)
        threads.add(threading.get_ident())
        if len(threads) == 2:
            both.set()
        if upload.filename == "slow-bad":
            fast_failed.wait(5)  # fails after the later bad file has failed
            raise ServiceError("IMAGE_INVALID", "slow-bad is bad")
        if upload.filename == "bad":
            fast_failed.set()
            raise ServiceError("IMAGE_INVALID", "bad is bad")
        both.wait(5)  # the first file waits for the second thread to take one
        return f"crop {i}"

    monkeypatch.setattr(predict, "_crop", crop)
    settings = Settings(database_url="", broker_url="")
    good = [_File(f"f{i}") for i in range(8)]
    assert predict._crops(good, None, settings) == [f"crop {i}" for i in range(8)]
    assert len(threads) == 2  # this thread and one helper
    calls.clear()
    files = [_File("slow-bad"), _File("bad")] + [_File(f"f{i}") for i in range(20)]
    with pytest.raises(ServiceError, match="slow-bad is bad"):  # the first in order
        predict._crops(files, None, settings)
    assert sorted(calls) == [0, 1]  # after a bad file, neither thread takes another

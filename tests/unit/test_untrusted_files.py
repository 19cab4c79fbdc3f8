"""Anything loaded from a file a user could have placed is data, never code.

Each test plants a genuinely malicious pickle (unpickling it creates a marker file) where a
model would be, and checks that every loader refuses it and that the marker never appears.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.backbones import BACKBONES
from worker.training.checkpoint import CheckpointRefused, load_checkpoint
from worker.training.weights import WeightsSource, WeightsUnavailable, load_state_file

ROOT = Path(__file__).resolve().parents[2]


class Evil:
    """Unpickling this calls `Path.touch(marker)`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _NoStorage(pickle.Unpickler):
    """A full (unsafe) unpickler for the test's own payload; torch's tensor references
    become None (so rebuilding a tensor then fails, after the payload, which comes first,
    has run): everything else runs as any `pickle.load` would."""

    def persistent_load(self, pid):
        return None


def _full_checkpoint(marker: Path) -> dict:
    """Shaped exactly like what `fit` checkpoints, so only the payload can be refused."""
    return {
        "evil": Evil(marker),
        "phase": "fine_tune",
        "epoch": 1,
        "model": {"weight": torch.zeros(2, 2)},
        "history": [],
        "best_metrics": {},
        "best_state": None,
        "stale_epochs": 0,
        "extra": {},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": 3},
        "loader_rng": torch.Generator().get_state(),
        "torch_rng": torch.get_rng_state(),
        "planned": 3,
    }


@dataclass
class Payloads:
    marker: Path
    raw: Path  # a plain pickle file (as `pickle.dump` writes it)
    zipped: Path  # torch.save's zip format, data.pkl holds the payload
    legacy: Path  # torch.save's legacy (pre-1.6) format
    torchscript: Path  # a real TorchScript archive whose data.pkl is the payload

    def all(self) -> list[Path]:
        return [self.raw, self.zipped, self.legacy, self.torchscript]


@pytest.fixture
def payloads(tmp_path: Path) -> Payloads:
    marker = tmp_path / "PWNED"
    files = tmp_path / "files"
    files.mkdir()
    raw, zipped, legacy = files / "raw.pkl", files / "zipped.pt", files / "legacy.pt"
    raw.write_bytes(pickle.dumps(_full_checkpoint(marker)))
    torch.save(_full_checkpoint(marker), zipped)
    torch.save(_full_checkpoint(marker), legacy, _use_new_zipfile_serialization=False)

    # A TorchScript file (what the demo and users load) with its pickles swapped for ours.
    good = files / "good.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(good))
    torchscript = files / "evil.torchscript.pt"
    evil_bytes = pickle.dumps(Evil(marker), protocol=2)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(torchscript, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith(("/data.pkl", "/constants.pkl")):
                data = evil_bytes
            zout.writestr(info, data)

    # The payloads are live: a full unpickle of any of them creates the marker.
    with zipfile.ZipFile(zipped) as zf:
        data_pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    with zipfile.ZipFile(torchscript) as zf:
        script_pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    for blob in (raw.read_bytes(), data_pkl, script_pkl):
        assert not marker.exists()
        with contextlib.suppress(Exception):
            _NoStorage(io.BytesIO(blob)).load()
        assert marker.exists(), "the test payload does not work: the tests would prove nothing"
        marker.unlink()
    return Payloads(marker, raw, zipped, legacy, torchscript)


# --- resume checkpoints (worker/tasks.py) ---------------------------------------------------


def test_load_checkpoint_refuses_every_malicious_file(payloads: Payloads):
    for path in payloads.all():
        with pytest.raises(CheckpointRefused, match="not a valid weights-only checkpoint") as info:
            load_checkpoint(path)
        assert "refused" in str(info.value) and str(path) in str(info.value)
        assert "False" not in str(info.value)  # torch's advice (load it unsafely) is dropped
        assert not payloads.marker.exists(), f"loading {path.name} executed its payload"


def test_load_checkpoint_names_the_refused_global(payloads: Payloads):
    with pytest.raises(CheckpointRefused, match="Unsupported global"):
        load_checkpoint(payloads.zipped)
    assert not payloads.marker.exists()


def test_load_checkpoint_accepts_the_same_checkpoint_without_the_payload(tmp_path: Path):
    state = _full_checkpoint(tmp_path / "PWNED")
    del state["evil"]
    torch.save(state, tmp_path / "ok.pt")
    loaded = load_checkpoint(tmp_path / "ok.pt")
    assert (loaded["phase"], loaded["epoch"]) == ("fine_tune", 1)
    assert torch.equal(loaded["model"]["weight"], torch.zeros(2, 2))


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint", b"PK\x03\x04truncated"],
    ids=["empty", "junk", "truncated-zip"],
)
def test_load_checkpoint_refuses_corrupt_files(tmp_path: Path, content: bytes):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CheckpointRefused, match="refused"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "obj", [[1, 2], {"phase": "fine_tune"}, {"state_dict": {}}], ids=["list", "partial", "other"]
)
def test_load_checkpoint_refuses_data_that_is_not_a_checkpoint(tmp_path: Path, obj):
    torch.save(obj, tmp_path / "other.pt")
    with pytest.raises(CheckpointRefused, match="refused"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_fine_tuning_checkpoint_without_its_optimizer_is_refused_not_crashed_on(
    tmp_path: Path,
):
    """fit would raise KeyError half-way into the resume: refuse it up front instead, so the
    job trains from the start."""
    state = _full_checkpoint(tmp_path / "PWNED")
    del state["evil"], state["optimizer"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(CheckpointRefused, match="missing optimizer"):
        load_checkpoint(tmp_path / "old.pt")


# --- pretrained weights (worker/training/weights.py) ----------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_weights_dir_refuses_a_malicious_file_under_every_accepted_name(
    payloads: Payloads, tmp_path: Path, suffix: str
):
    spec = BACKBONES["efficientnet_lite0"]
    for source in payloads.all():
        weights_dir = tmp_path / f"weights-{source.stem}"
        weights_dir.mkdir()
        planted = weights_dir / f"{spec.name}{suffix}"
        planted.write_bytes(source.read_bytes())
        with pytest.raises(WeightsUnavailable, match="refused") as info:
            WeightsSource(weights_dir=weights_dir).resolve(spec)
        assert str(planted) in str(info.value)
        assert not payloads.marker.exists(), f"{planted.name} from {source.name} was executed"


def test_torch_hub_cache_refuses_a_malicious_file(payloads: Payloads, tmp_path: Path):
    spec = BACKBONES["resnet18"]
    assert spec.hub_file
    for source in payloads.all():
        hub = tmp_path / f"hub-{source.stem}"
        (hub / "checkpoints").mkdir(parents=True)
        (hub / "checkpoints" / spec.hub_file).write_bytes(source.read_bytes())
        with pytest.raises(WeightsUnavailable, match="refused"):
            WeightsSource(torch_hub_dir=hub, hf_cache=tmp_path / "no-hf").resolve(spec)
        assert not payloads.marker.exists()


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hugging_face_cache_refuses_a_malicious_file(
    payloads: Payloads, tmp_path: Path, filename: str
):
    spec = BACKBONES["efficientnet_b0"]
    org, name = spec.hub_id.split("/")
    for source in payloads.all():
        cache = tmp_path / f"hf-{source.stem}"
        repo = cache / f"models--{org}--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("abc123")
        (repo / "snapshots" / "abc123").mkdir(parents=True)
        (repo / "snapshots" / "abc123" / filename).write_bytes(source.read_bytes())
        with pytest.raises(WeightsUnavailable, match="refused"):
            WeightsSource(torch_hub_dir=tmp_path / "no-hub", hf_cache=cache).resolve(spec)
        assert not payloads.marker.exists()


def test_load_state_file_refuses_directly(payloads: Payloads):
    for path in payloads.all():
        with pytest.raises(WeightsUnavailable, match="not a valid weights-only state dict") as info:
            load_state_file(path)
        assert str(path) in str(info.value) and "False" not in str(info.value)
        assert not payloads.marker.exists()


# --- exported models: safetensors and TorchScript -------------------------------------------


def test_safetensors_refuses_a_malicious_pickle(payloads: Payloads):
    for path in payloads.all():
        with pytest.raises(SafetensorError):
            load_file(str(path))
        assert not payloads.marker.exists()


def test_export_load_model_refuses_a_malicious_pickle(payloads: Payloads, tmp_path: Path):
    from worker.training.export import load_model

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "metadata.json").write_text(
        json.dumps({"backbone": "efficientnet_lite0", "num_classes": 3})
    )
    for path in payloads.all():
        (model_dir / "model.safetensors").write_bytes(path.read_bytes())
        with pytest.raises(SafetensorError):
            load_model(model_dir)
        assert not payloads.marker.exists()


def test_torchscript_loader_refuses_a_malicious_pickle(payloads: Payloads):
    for path in payloads.all():
        with pytest.raises(RuntimeError):
            torch.jit.load(str(path), map_location="cpu")
        assert not payloads.marker.exists()


def test_demo_refuses_a_downloaded_model_with_a_malicious_torchscript(
    payloads: Payloads, tmp_path: Path
):
    from cli.demo import evaluate_download

    model_zip = tmp_path / "download" / "model.zip"
    model_zip.parent.mkdir()
    with zipfile.ZipFile(model_zip, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"class_names": ["0", "1"]}))
        zf.write(payloads.torchscript, "model.torchscript.pt")
    with pytest.raises(RuntimeError, match="Unknown type name"):
        evaluate_download(model_zip, [])
    assert not payloads.marker.exists()


# --- the source tree ------------------------------------------------------------------------

SOURCES = sorted(p for d in ("service", "worker", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_weights_only_false_anywhere():
    assert SOURCES
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if "weights_only=False" in p.read_text()]
    assert not offenders, f"weights_only=False in {offenders}"


def test_every_torch_load_passes_weights_only_true():
    seen, offenders = 0, []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name in ("torch.load", "torch.serialization.load"):
                seen += 1
                flag = next((k for k in node.keywords if k.arg == "weights_only"), None)
                if not (
                    flag is not None
                    and isinstance(flag.value, ast.Constant)
                    and flag.value.value is True
                ):
                    offenders.append(where)
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                offenders.append(f"{where} ({name})")
            if name.endswith(("np.load", "numpy.load")) and any(
                k.arg == "allow_pickle" for k in node.keywords
            ):
                offenders.append(f"{where} (allow_pickle)")
    assert seen >= 2  # the checkpoint loader and the weights loader
    assert not offenders, f"unsafe deserialisation at {offenders}"


def test_no_module_imports_a_pickle_loader():
    banned = {
        "pickle",
        "cPickle",
        "dill",
        "cloudpickle",
        "joblib",
        "shelve",
        "marshal",
        "torch.load",
    }
    offenders = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
                if node.module in ("torch", "torch.serialization"):
                    # `from torch import load` would hide a call from the check above
                    names += [f"torch.{a.name}" for a in node.names if a.name == "load"]
            else:
                continue
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} ({n})" for n in names if n in banned
            ]
    assert not offenders, f"pickle-style loaders imported at {offenders}"

"""Proxy datasets for quality benchmarks, built only from data that ships in Python packages
(scikit-learn, scikit-image), so they run offline and anyone can rebuild them bit for bit.

Every builder is deterministic in its seed and returns a `Proxy`: uint8 images in memory, the
labels, the class names and a held-out test split that no training ever sees (stratified per
class for single-label proxies; built from disjoint source digits for the multi-label one).

Proxies (`build(name, seed)`):

- `digits`: scikit-learn's 1797 handwritten digits at their native 8x8, 10 classes.
- `digits-degraded`: the same digits, each degraded by a fixed recipe with per-image draws
  from the seed (see `degrade_digit`): upscaled 8 -> 32 px (bicubic), shifted by up to
  +-4 px in x and y (zero fill), Gaussian blur with sigma in [0.5, 1.5], downscaled to
  16 px (box filter), then additive Gaussian noise with sigma 0.12 (of the 0..255 range).
- `lfw`: scikit-image's `lfw_subset`, 200 25x25 crops, 100 faces then 100 non-faces.
- `textures`: non-overlapping 32x32 patches of scikit-image's brick, grass and gravel
  photographs (256 per class). Each patch's mean and contrast are set to the dataset's, so
  plain brightness cannot tell the classes apart. Patches never overlap, so no test pixel is
  seen in training; neighbouring patches are still alike (as in any texture benchmark).
- `digits-pairs` (multi-label): two 8x8 digits side by side (8x16), labelled with the set of
  digits present (one label when both are the same). The source digits are split first
  (stratified), and train pairs are drawn only from train digits, test pairs only from test
  digits, so no test digit image is ever seen in training.

Options: `label_noise` relabels that fraction of the *training* images to a different class,
uniformly (test labels stay clean; `Proxy.flipped` lists which); `per_class` keeps the first
N images of each class (after a seeded shuffle), for smoke runs (`digits-pairs`: 10 x N pairs).
"""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TEST_FRACTION = 0.2


@dataclass
class Proxy:
    name: str
    seed: int
    images: np.ndarray  # uint8, (N, H, W) grayscale or (N, H, W, 3)
    labels: np.ndarray  # int64 (N,), or multi-hot (N, C) when multi-label; training labels noisy
    classes: list[str]
    train_idx: np.ndarray
    test_idx: np.ndarray
    recipe: str
    hflip_safe: bool = True  # does a mirror image keep its class? (not for digits)
    clean_labels: np.ndarray | None = None  # before planted label noise
    flipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    parts: np.ndarray | None = None  # digits-pairs: the two source digit indices per image

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    @property
    def label_noise(self) -> float:
        return len(self.flipped) / max(1, len(self.train_idx))

    def describe(self) -> str:
        h, w = self.images.shape[1:3]
        noise = f", {len(self.flipped)} training labels flipped" if len(self.flipped) else ""
        return (
            f"{self.name} (seed {self.seed}): {len(self.train_idx)} train / {len(self.test_idx)} "
            f"test images, {h}x{w}, {len(self.classes)} classes{noise}"
        )

    def write_splits_zip(self, path: Path) -> Path:
        """The proxy as a user would upload it: `train/<class>/*.png` and `test/<class>/*.png`
        (the service's split layout: it trains on `train/` only and scores `test/`)."""
        if self.multilabel:
            raise ValueError(f"{self.name} is multi-label: it has no class-folder layout")
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for split, idx in (("train", self.train_idx), ("test", self.test_idx)):
                for i in idx:
                    cls = self.classes[int(self.labels[i])]
                    zf.writestr(f"{split}/{cls}/{int(i):05d}.png", png_bytes(self.images[i]))
        return path

    def write_manifest_zip(
        self, path: Path, square: bool = False, val_idx: np.ndarray | None = None
    ) -> Path:
        """The proxy as a manifest upload: `images/<index>.png` and `labels.csv` with `path`,
        the class(es) and `split` (train or test; `val` for the training images in
        `val_idx`, when given). A multi-label proxy's classes go in a `labels` column,
        `|`-separated (a multi-label dataset); otherwise in `label`. With `square`, each
        image is centred on a black square, so the service's centre crop keeps all of it
        (a digits-pairs image is 8x16: cropped, each digit would lose half)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        column = "labels" if self.multilabel else "label"
        held = set() if val_idx is None else {int(i) for i in val_idx}
        rows = [f"path,{column},split"]
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for split, idx in (("train", self.train_idx), ("test", self.test_idx)):
                for i in idx:
                    name = f"images/{int(i):05d}.png"
                    img = pad_square(self.images[i]) if square else self.images[i]
                    zf.writestr(name, png_bytes(img))
                    if self.multilabel:
                        present = np.flatnonzero(self.labels[i])
                        classes = "|".join(self.classes[int(c)] for c in present)
                    else:
                        classes = self.classes[int(self.labels[i])]
                    row_split = "val" if split == "train" and int(i) in held else split
                    rows.append(f"{name},{classes},{row_split}")
            zf.writestr("labels.csv", "\n".join(rows) + "\n")
        return path


def pad_square(img: np.ndarray) -> np.ndarray:
    """`img` centred on a black (zero) square as large as its longer side."""
    h, w = img.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, *img.shape[2:]), dtype=img.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def read_split_zip(path: Path, split: str) -> tuple[list[Image.Image], list[str]]:
    """The `split` images of a splits zip and their class folder names, decoded (PIL, loaded)."""
    images, names = [], []
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) != 3 or parts[0] != split or not parts[2]:
                continue
            with zf.open(name) as f, Image.open(f) as img:
                img.load()
                images.append(img.copy())
            names.append(parts[1])
    return images, names


def stratified_test_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: per class, round(fraction * n) images (at least one) held out."""
    rng = np.random.default_rng([seed, 7919])  # its own stream: the split never shifts degrades
    train, test = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_test = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _keep_per_class(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, 104729])
    keep = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        keep.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(keep))


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    targets = d.target.astype(np.int64)
    images.flags.writeable = targets.flags.writeable = False  # shared by every build
    return images, targets


def degrade_digit(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 8x8 digit through the `digits-degraded` recipe (module docstring): 16x16 uint8."""
    from scipy.ndimage import gaussian_filter

    big = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BICUBIC), np.float64)
    dx, dy = rng.integers(-4, 5, size=2)
    shifted = np.zeros_like(big)
    src = big[max(0, -dy) : 32 - max(0, dy), max(0, -dx) : 32 - max(0, dx)]
    shifted[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    blurred = gaussian_filter(shifted, sigma=rng.uniform(0.5, 1.5))
    small = Image.fromarray(np.clip(blurred, 0, 255).astype(np.uint8))
    small_arr = np.asarray(small.resize((16, 16), Image.Resampling.BOX), np.float64)
    noisy = small_arr + rng.normal(0.0, 0.12 * 255, size=small_arr.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _digits(seed: int, degraded: bool) -> tuple[np.ndarray, np.ndarray, list[str], str, bool]:
    images, labels = _load_digits()
    recipe = "scikit-learn digits, native 8x8, 16 grey levels scaled to 0..255"
    if degraded:
        rng = np.random.default_rng([seed, 31337])
        images = np.stack([degrade_digit(im, rng) for im in images])
        recipe = (
            "digits 8->32 px bicubic, shift +-4 px, blur sigma U(0.5, 1.5), 16 px box "
            "downscale, noise sigma 0.12"
        )
    return images, labels, [str(c) for c in range(10)], recipe, False


def _lfw(seed: int) -> tuple[np.ndarray, np.ndarray, list[str], str, bool]:
    from skimage.data import lfw_subset

    faces = lfw_subset()  # float in [0, 1]: 100 faces, then 100 non-faces
    images = (faces * 255).round().astype(np.uint8)
    labels = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    return images, labels, ["face", "not_face"], "scikit-image lfw_subset, 25x25", True


TEXTURES = ("brick", "grass", "gravel")


def _textures(seed: int) -> tuple[np.ndarray, np.ndarray, list[str], str, bool]:
    import skimage.data

    size = 32
    patches, labels = [], []
    all_patches = []
    for c, name in enumerate(TEXTURES):
        photo = getattr(skimage.data, name)().astype(np.float64)
        h, w = (photo.shape[0] // size) * size, (photo.shape[1] // size) * size
        grid = photo[:h, :w].reshape(h // size, size, w // size, size).swapaxes(1, 2)
        for p in grid.reshape(-1, size, size):
            all_patches.append(p)
            labels.append(c)
    mean = float(np.mean([p.mean() for p in all_patches]))
    std = float(np.mean([p.std() for p in all_patches]))
    for p in all_patches:
        norm = (p - p.mean()) / max(p.std(), 1e-6) * std + mean
        patches.append(np.clip(np.round(norm), 0, 255).astype(np.uint8))
    recipe = "non-overlapping 32x32 patches of skimage brick/grass/gravel, mean+contrast equalized"
    return np.stack(patches), np.array(labels, dtype=np.int64), list(TEXTURES), recipe, True


SingleBuilder = Callable[[int], tuple[np.ndarray, np.ndarray, list[str], str, bool]]
SINGLE_LABEL: dict[str, SingleBuilder] = {
    "digits": lambda seed: _digits(seed, degraded=False),
    "digits-degraded": lambda seed: _digits(seed, degraded=True),
    "lfw": _lfw,
    "textures": _textures,
}
PROXIES = [*SINGLE_LABEL, "digits-pairs"]


def plant_label_noise(
    labels: np.ndarray, train_idx: np.ndarray, rate: float, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped indices): round(rate * len(train)) training labels moved to
    another class, uniformly; test labels are never touched."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {rate}")
    rng = np.random.default_rng([seed, 65537])
    n = int(round(rate * len(train_idx)))
    flipped = np.sort(rng.choice(train_idx, size=n, replace=False)) if n else train_idx[:0]
    noisy = labels.copy()
    for i in flipped:
        noisy[i] = (labels[i] + rng.integers(1, n_classes)) % n_classes
    return noisy, flipped


def build_pairs(seed: int, n_pairs: int = 1500, fraction: float = TEST_FRACTION) -> Proxy:
    """`digits-pairs`: see the module docstring."""
    digits, targets = _load_digits()
    src_train, src_test = stratified_test_split(targets, fraction, seed)
    rng = np.random.default_rng([seed, 271828])
    n_test = int(round(fraction * n_pairs))
    parts = np.concatenate(
        [
            rng.choice(src_train, size=(n_pairs - n_test, 2)),
            rng.choice(src_test, size=(n_test, 2)),
        ]
    )
    images = np.concatenate([digits[parts[:, 0]], digits[parts[:, 1]]], axis=2)
    labels = np.zeros((n_pairs, 10), dtype=np.int64)
    labels[np.arange(n_pairs), targets[parts[:, 0]]] = 1
    labels[np.arange(n_pairs), targets[parts[:, 1]]] = 1
    return Proxy(
        name="digits-pairs",
        seed=seed,
        images=images,
        labels=labels,
        classes=[str(c) for c in range(10)],
        train_idx=np.arange(n_pairs - n_test),
        test_idx=np.arange(n_pairs - n_test, n_pairs),
        recipe="two 8x8 digits side by side (8x16), multi-hot labels of the digits present; "
        "train and test pairs drawn from disjoint, stratified source digits",
        hflip_safe=False,
        clean_labels=labels,
        parts=parts,
    )


def build(
    name: str,
    seed: int,
    label_noise: float = 0.0,
    per_class: int | None = None,
    test_fraction: float = TEST_FRACTION,
) -> Proxy:
    """The proxy `name` for `seed` (same arguments, same arrays, every time)."""
    if name == "digits-pairs":
        if label_noise:
            raise ValueError("label_noise is for single-label proxies only")
        if per_class is None:
            return build_pairs(seed, fraction=test_fraction)
        # Smoke runs: 10 x per_class pairs (each class then on about 2 x per_class).
        small = build_pairs(seed, n_pairs=10 * per_class, fraction=test_fraction)
        small.name = f"{name}[{10 * per_class} pairs]"
        return small
    if name not in SINGLE_LABEL:
        raise ValueError(f"unknown proxy {name!r}; available: {', '.join(PROXIES)}")
    images, labels, classes, recipe, hflip_safe = SINGLE_LABEL[name](seed)
    keep = _keep_per_class(labels, per_class, seed)
    images, labels = images[keep], labels[keep]
    train_idx, test_idx = stratified_test_split(labels, test_fraction, seed)
    noisy, flipped = plant_label_noise(labels, train_idx, label_noise, len(classes), seed)
    return Proxy(
        name=name if per_class is None else f"{name}[{per_class} per class]",
        seed=seed,
        images=images,
        labels=noisy,
        classes=classes,
        train_idx=train_idx,
        test_idx=test_idx,
        recipe=recipe,
        hflip_safe=hflip_safe,
        clean_labels=labels,
        flipped=flipped,
    )

"""How an image becomes pixels, in one place for ingest, training, the workers and the API.

`to_rgb` and `resize_center_crop` are what training evaluates with; `decode_upload` is how the
API (predict) and the light workers (explain) open an image a user sends, with the same
decoders and pixel limit as ingest; `preprocess` turns decoded images into the float32 NCHW
batch a model's `metadata.json` asks for (no torch: the API runs models with onnxruntime).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The decoders accepted everywhere (PIL format names); anything else is refused unread.
PIL_FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]

_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}


def to_rgb(img: Image.Image) -> Image.Image:
    """The one conversion used at ingest, training and prediction: EXIF orientation applied,
    palette/alpha/CMYK/grayscale to RGB (transparent pixels composited on white)."""
    img = ImageOps.exif_transpose(img)  # a new image (Pillow copies even when upright)
    if img.mode == "RGB":
        return img  # convert("RGB") would only copy it again
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Shorter side to `size`, then the central size x size square, as uint8 HWC."""
    img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != img.size:  # at the size already, Pillow's resize is a copy
        img = img.resize((nw, nh), _INTERP.get(interpolation, Image.Resampling.BICUBIC))
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(img, dtype=np.uint8)  # slicing the array: one copy fewer than img.crop
    if arr.shape[:2] == (size, size):
        return arr
    # A copy, never a view: a view would keep the whole resized image alive (training
    # caches one crop per image; a portrait's view holds h / w times its bytes).
    return arr[top : top + size, left : left + size].copy()


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decode one uploaded image (first frame), upright and RGB.

    ValueError with a reason a user can act on: not an image (or a format we do not accept),
    over `max_pixels` (checked from the header, before any pixel is decoded: a decompression
    bomb costs nothing), corrupt or truncated."""
    if not data:
        raise ValueError("the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ValueError(
                        f"image is {width}x{height} = {width * height} pixels, over the "
                        f"limit of {max_pixels}"
                    )
                img.seek(0)  # GIF and multi-page TIFF: the first frame is the image
                img.load()
                return to_rgb(img)
    except UnidentifiedImageError as exc:
        raise ValueError(f"not a readable image (accepted: {', '.join(PIL_FORMATS)})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"image data is corrupt or truncated: {exc}") from exc


def crop_for_model(img: Image.Image, metadata: dict[str, Any]) -> np.ndarray:
    """One image -> the uint8 HWC square the model sees (before normalisation), exactly as
    the model was evaluated in training: resize the shorter side, centre crop."""
    size = int(metadata["input_size"][1])
    resize = int(metadata["resize_size"])
    arr = resize_center_crop(img, resize, metadata.get("interpolation", "bicubic"))
    off = int(round((resize - size) / 2.0))  # as torchvision CenterCrop
    return arr[off : off + size, off : off + size]


@lru_cache(maxsize=32)
def _lookup(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: each channel's normalized value of every uint8 level, computed with
    the same float32 operations as `(x / 255 - mean) / std` on the whole image, so a lookup
    gives bit-identical values at a tenth of the cost (one pass, no float temporaries)."""
    levels = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    table = ((levels - m) / s).astype(np.float32)
    table.flags.writeable = False
    return table


def normalize(crops: Sequence[np.ndarray], metadata: dict[str, Any]) -> np.ndarray:
    """uint8 HWC crops (from `crop_for_model`) -> the normalized float32 NCHW batch."""
    table = _lookup(tuple(metadata["mean"]), tuple(metadata["std"]))
    first = crops[0]
    out = np.empty((len(crops), 3, first.shape[0], first.shape[1]), dtype=np.float32)
    for i, crop in enumerate(crops):
        for c in range(3):
            # mode="clip": uint8 indices are always in range, and "raise" buffers `out`.
            np.take(table[c], crop[..., c], out=out[i, c], mode="clip")
    return out


def preprocess(images: Sequence[Image.Image], metadata: dict[str, Any]) -> np.ndarray:
    """PIL images -> the normalized float32 NCHW batch the model takes."""
    return normalize([crop_for_model(img, metadata) for img in images], metadata)

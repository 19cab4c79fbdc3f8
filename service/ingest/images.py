"""Decode an image once, fully, with only the decoders we accept; fingerprint it."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PIL_FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]


@dataclass
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str
    dhash: int  # 64-bit difference hash, for near-duplicates


def difference_hash(img: Image.Image) -> int:
    """dHash: 9x8 grayscale, one bit per horizontally adjacent pair."""
    small = img.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    px = small.tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (px[row * 9 + col] > px[row * 9 + col + 1])
    return bits


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Fully decode `data`; ValueError with a readable reason when it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ValueError(
                        f"image is {width}x{height} = {width * height} pixels, over the "
                        f"limit of {max_pixels} (MAX_IMAGE_PIXELS)"
                    )
                fmt, mode = img.format or "?", img.mode
                img.seek(0)  # GIF and multi-page TIFF: the first frame is the image
                img.load()
                upright = ImageOps.exif_transpose(img)
                return ImageInfo(upright.width, upright.height, fmt, mode, difference_hash(upright))
    except UnidentifiedImageError as exc:
        raise ValueError(f"not a readable image (accepted: {', '.join(PIL_FORMATS)})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"image data is corrupt or truncated: {exc}") from exc

"""Contact sheets: a grid of image thumbnails, each with a few caption lines, as one PNG;
and the two a finished job draws, its label issues and its top losses (`label_issues.py`).

Drawn with PIL rather than matplotlib: a sheet of 24 tiles takes milliseconds, which
matters for what runs at the end of every job (label issues, top losses). Text is the
user's (paths, class names), drawn as plain text: nothing in it is interpreted.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

THUMB = 128  # px, each thumbnail's side; also the width its caption must fit in
COLUMNS = 6
PAD = 10
FONT_PX = 12
LINE = FONT_PX + 3
GREY, RED, GREEN, BLACK = "#555555", "#b00020", "#006b2e", "#000000"
SHEET_TILES = 24  # images on a label issues or top losses sheet


@dataclass
class Tile:
    image: np.ndarray  # uint8 (H, W, 3) or (H, W)
    rank: int
    path: str  # in the archive; its end is shown when it is long
    lines: list[str]  # caption lines under the rank and path
    colors: list[str] = field(default_factory=list)  # per line; black past the list


@cache
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def fit_text(text: str, font: Any, width: float, keep_end: bool = False) -> str:
    """`text`, cut with an ellipsis until it is at most `width` px wide: its start kept, or
    with `keep_end` its end (a path's file name says more than its first folder)."""
    if font.getlength(text) <= width:
        return text
    lo, hi = 0, len(text)  # the most characters that fit beside the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        part = text[-mid:] if keep_end else text[:mid]
        if font.getlength("…" + part if keep_end else part + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return "…"
    return "…" + text[-lo:] if keep_end else text[:lo] + "…"


def _thumbnail(image: np.ndarray) -> Image.Image:
    """The image fitted in THUMB x THUMB; small images are enlarged by nearest neighbour so
    their pixels stay visible (an 8-px digit is a 16-px blocky square, not a blur)."""
    img = Image.fromarray(image).convert("RGB")
    scale = THUMB / max(img.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, resample)


def sheet_png(tiles: list[Tile], title: str) -> bytes:
    """The tiles in rows of COLUMNS under `title`; each caption starts with the tile's rank
    and path (grey), then its lines in their colours, each cut to the thumbnail's width."""
    font, title_font = _font(FONT_PX), _font(FONT_PX + 4)
    n_lines = 1 + max((len(t.lines) for t in tiles), default=0)
    cell_w, cell_h = THUMB + PAD, THUMB + PAD // 2 + n_lines * LINE + PAD
    cols = max(1, min(COLUMNS, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    head = FONT_PX + 4 + 2 * PAD
    width = max(cols * cell_w + PAD, int(title_font.getlength(title)) + 2 * PAD)
    sheet = Image.new("RGB", (width, head + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), title, fill=BLACK, font=title_font)
    for k, tile in enumerate(tiles):
        x = PAD + (k % cols) * cell_w
        y = head + (k // cols) * cell_h
        thumb = _thumbnail(tile.image)
        draw.rectangle((x - 1, y - 1, x + THUMB, y + THUMB), outline="#cccccc")
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        rank = f"#{tile.rank} "
        path = fit_text(tile.path, font, THUMB - font.getlength(rank), keep_end=True)
        captions = [(rank + path, GREY)] + [
            (line, tile.colors[i] if i < len(tile.colors) else BLACK)
            for i, line in enumerate(tile.lines)
        ]
        for i, (line, color) in enumerate(captions):
            text = fit_text(line, font, THUMB)
            draw.text((x, y + THUMB + PAD // 2 + i * LINE), text, fill=color, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _label_text(value: str | list[str]) -> str:
    return ", ".join(value) if isinstance(value, list) else value


def issues_sheet(issues: list[dict[str, Any]], checked: int, cache: np.ndarray) -> bytes:
    """The first SHEET_TILES label issues (`label_issues.py`'s items), their images from the
    job's image cache: given label red, suggested green."""
    if not issues:  # drawn all the same: a sheet that says so beats a missing one
        return sheet_png([], f"label issues: none of the {checked} labelled images flagged")
    tiles = [
        Tile(
            np.asarray(cache[item["index"]]),
            rank,
            item["path"],
            [
                f"given: {_label_text(item['given_label'])}",
                f"suggested: {_label_text(item['suggested_label'])}",
                f"label quality {item['score']:.3g}",
            ],
            [RED, GREEN],
        )
        for rank, item in enumerate(issues[:SHEET_TILES], 1)
    ]
    title = (
        f"label issues: {len(issues)} of {checked} labelled images flagged "
        f"(first {len(tiles)}, most suspect first)"
    )
    return sheet_png(tiles, title)


def losses_sheet(
    losses: list[dict[str, Any]], cache: np.ndarray, held_out: bool = True
) -> bytes | None:
    """The first SHEET_TILES top losses: the prediction green when right, red when wrong.
    `held_out` False: the delivered model was refitted on these images (the title says)."""
    if not losses:
        return None
    shown = losses[:SHEET_TILES]
    tiles = [
        Tile(
            np.asarray(cache[item["index"]]),
            rank,
            item["path"],
            [
                f"given: {_label_text(item['given_label'])}",
                f"predicted: {_label_text(item['predicted_label'])}",
                f"p {item['probability']:.3f}, loss {item['loss']:.3g}",
            ],
            [BLACK, GREEN if item["correct"] else RED],
        )
        for rank, item in enumerate(shown, 1)
    ]
    wrong = sum(not item["correct"] for item in shown)
    title = (
        f"top losses: the {len(tiles)} validation images with the highest loss, {wrong} wrong"
        + ("" if held_out else " (not held out: the model was refitted on them)")
    )
    return sheet_png(tiles, title)

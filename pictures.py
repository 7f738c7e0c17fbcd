"""Pictures: class colours, panels scaled up, title lines with colour swatches, GIFs.

What this file teaches
    How a segmentation is shown so that a student can read it: class id c is drawn in row c of the
    AVSS (PASCAL-VOC) palette, the colours the AVSBench label PNGs use; small frames are scaled up
    by whole factors (nearest neighbour, so every pixel of the prediction stays visible); a title
    line names each class next to a swatch of its colour. predict.py draws a clip's overlays with
    these functions, train.py its evaluation overlays, tools/diagnostics.py its clip pictures.
    Nothing here runs a model or imports another file of the repository but data.py (the palette).

Reading order
    PALETTE, colour_ids, overlay (class colours on a frame); scale_up, titled, caption, stack
    (panels and title lines); save_gif; font.

Shape alphabet (the repository's one shape alphabet: docs/shapes.md): H, W a panel's size, Hn, Wn
a frame's own size.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import data

MIN_PANEL = 256          # pictures scale every panel up (nearest neighbour) to at least this size
PALETTE = data.voc_palette(256)  # (256, 3) the AVSS (PASCAL-VOC) colours; row j is class id j


def colour_ids(ids: np.ndarray) -> np.ndarray:
    """Class ids (H, W) -> their AVSS palette colours (H, W, 3) uint8."""
    return PALETTE[ids % 256]                                          # (H, W, 3)


def overlay(rgb: np.ndarray, ids: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The frame (Hn, Wn, 3) uint8 with each labelled pixel mixed with its class colour."""
    mixed = (1 - alpha) * rgb + alpha * colour_ids(ids).astype(np.float64)  # (Hn, Wn, 3)
    return np.where(ids[..., None] > 0, mixed, rgb).round().astype(np.uint8)  # (Hn, Wn, 3)


def scale_up(array: np.ndarray, min_side: int = MIN_PANEL) -> np.ndarray:
    """(H, W, 3) uint8 repeated (nearest neighbour) by the smallest integer factor that makes
    its shorter side at least min_side."""
    factor = max(1, math.ceil(min_side / min(array.shape[:2])))
    return array.repeat(factor, axis=0).repeat(factor, axis=1)         # (H*factor, W*factor, 3)


def titled(array: np.ndarray, lines: list, min_side: int = MIN_PANEL) -> Image.Image:
    """A picture (scaled up to min_side) under title lines. Each line is a list of (text,
    colour or None) pieces; a colour draws a swatch of that class colour before the text."""
    body = Image.fromarray(scale_up(array, min_side))
    return stack([caption(body.width, lines), body])


def caption(width: int, lines: list, size: int = 14) -> Image.Image:
    """White strip of `width` px with the lines of titled() drawn on it, a line wrapped where a
    piece would run past the right edge."""
    f = font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, row = [], 0                                # (x, row, text, colour) of every piece
    for pieces in lines:
        x = 6
        for text, colour in pieces:
            length = int(measure.textlength(text, font=f)) + (size + 2 if colour is not None else 0)
            if x > 6 and x + length > width - 6:       # wrap before this piece
                x, row = 6 + size, row + 1
            placed.append((x, row, text, colour))
            x += length
        row += 1
    step = size + 6
    strip = Image.new("RGB", (width, step * row + 6), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, r, text, colour in placed:
        y = 4 + step * r
        if colour is not None:
            draw.rectangle([x, y + 1, x + size - 2, y + size - 1],
                           fill=tuple(int(v) for v in colour), outline=(0, 0, 0))
            x += size + 2
        draw.text((x, y), text, fill=(0, 0, 0), font=f)
    return strip


def stack(images: list, horizontal: bool = False, gap: int = 0) -> Image.Image:
    """Images one under the other (or side by side), on white, `gap` px apart."""
    if horizontal:
        size = (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images))
    else:
        size = (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1))
    out = Image.new("RGB", size, (255, 255, 255))
    offset = 0
    for image in images:
        out.paste(image, (offset, 0) if horizontal else (0, offset))
        offset += (image.width if horizontal else image.height) + gap
    return out


def save_gif(pictures: list, path: str, ms_per_frame: int = 1000) -> None:
    """An animated GIF (Pillow), one picture a second, looping; pictures are padded to one size."""
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    frames = []
    for picture in pictures:
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(picture, (0, 0))
        frames.append(canvas)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)


def font(size: int = 14):
    """Pillow's own font (no file, no new dependency); scalable from Pillow 10.1."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()

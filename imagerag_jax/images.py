"""Image conversion, grids and PNG writing (shared by the CLI, the trainer and evaluation)."""

from __future__ import annotations

import io
import math
import os
import textwrap
from typing import Sequence

import numpy as np

from imagerag_jax import storage

# Grids for people: the smaller side of a cell in pixels, and the caption size in points.
MIN_CELL = 96
CAPTION_FONT_SIZE = 13


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (B, H, W, C) -> uint8 in [0, 255]."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (B, H, W, C) into one (rows*H, cols*W, C) image, near-square by default."""
    b, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = img
    return grid


def save_png(image: np.ndarray, path: str) -> str:
    """Write one uint8 HxWxC (C in 1, 3, 4) image as PNG, creating the folder (`path` may be a URL)."""
    from PIL import Image

    if image.shape[-1] == 1:
        image = image[..., 0]
    if storage.is_url(path):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        with storage.open_file(path, "wb") as f:
            f.write(buffer.getvalue())
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def save_images(images, path: str, columns: int | None = None) -> str:
    """Save a batch in [-1, 1] as one PNG: the image itself for one, a grid for several."""
    arr = to_uint8(images)
    return save_png(arr[0] if len(arr) == 1 else make_grid(arr, columns), path)


def caption_list(prompts: Sequence[str], batch: int) -> list[str]:
    """Repeat/cycle prompts to fill a batch."""
    return [prompts[i % len(prompts)] for i in range(batch)]


def wrap_caption(text: str, width: int) -> list[str]:
    """A caption as lines of at most `width` characters, broken at spaces.

    Each newline in `text` starts a new line (so a label can put a number on a line of its own);
    a word longer than a line is the only thing ever split.

    Args:
        text: The caption; any str() of it is wrapped.
        width: The most characters a line may hold (at least 1).

    Returns:
        The lines, at least one (an empty caption is one empty line).
    """
    width = max(1, width)
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        # Cut only the words longer than a line, into line-long pieces, before wrapping: each then
        # starts a line of its own instead of filling the end of the line before it.
        pieces = [word[i:i + width] for word in paragraph.split() for i in range(0, len(word), width)]
        # break_on_hyphens=False: "left-most" stays whole like any other word.
        lines += textwrap.wrap(" ".join(pieces), width, break_long_words=False,
                               break_on_hyphens=False) or [""]
    return lines


def upscale(images: np.ndarray, min_side: int = MIN_CELL) -> np.ndarray:
    """Nearest-neighbour upscale of (..., H, W, C) images for people to look at.

    Repeats pixels by the smallest whole factor that makes both sides at least `min_side`, so a
    16x32 canvas is seen as blocks, not blurred. For pictures only: never feed the result to a
    metric or a test oracle.

    Args:
        images: uint8 (or any) array whose last three axes are H, W, C.
        min_side: The smaller side of the result is at least this many pixels.

    Returns:
        The images, repeated along H and W (unchanged when already large enough).
    """
    h, w = images.shape[-3:-1]
    factor = max(1, -(-min_side // min(h, w)))
    return np.repeat(np.repeat(images, factor, -3), factor, -2)


def _caption_font():
    """PIL's bundled font at a readable size (its bitmap fallback before Pillow 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=CAPTION_FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has no size argument (and no bundled FreeType font)
        return ImageFont.load_default()


def _fit_caption(text: str, font, width_px: int) -> list[str]:
    """`wrap_caption` at the most characters per line whose lines all fit `width_px` in `font`."""
    # The font is proportional: start from its narrow-letter width and shorten until it fits.
    chars = max(1, int(width_px // max(1.0, font.getlength("n"))))
    while True:
        lines = wrap_caption(text, chars)
        if chars == 1 or max(font.getlength(line) for line in lines) <= width_px:
            return lines
        chars -= 1


def labelled_grid(images: np.ndarray, labels: Sequence[Sequence[str]], pad: int = 4,
                  min_cell: int = MIN_CELL) -> np.ndarray:
    """A grid for people: each image upscaled, with its whole caption wrapped at words below it.

    Args:
        images: uint8 (R, C, H, W, 3): row r, column c is captioned labels[r][c].
        labels: R rows of C captions; a newline in a caption starts a line of its own.
        pad: White pixels between and around cells.
        min_cell: Images are upscaled (nearest neighbour) until their smaller side is at least this.

    Returns:
        One uint8 (H', W', 3) image; each row's caption band is as tall as its longest caption.
    """
    from PIL import Image, ImageDraw

    images = upscale(np.asarray(images), min_cell)
    rows, cols, h, w, _ = images.shape
    font = _caption_font()
    # The bottom of a tall, descending sample: one line's height in either kind of PIL font.
    line_h, spacing = font.getbbox("Agjy|")[3], 2
    wrapped = [[_fit_caption(labels[r][c], font, w) for c in range(cols)] for r in range(rows)]
    bands = [max(len(lines) for lines in row) * (line_h + spacing) + spacing for row in wrapped]
    tops = np.cumsum([pad] + [h + band + pad for band in bands])
    canvas = Image.new("RGB", (cols * (w + pad) + pad, int(tops[-1])), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        for c in range(cols):
            x, y = pad + c * (w + pad), int(tops[r])
            canvas.paste(Image.fromarray(images[r, c]), (x, y))
            # One draw per line at our own pitch, so the band measured above is the band drawn.
            for i, line in enumerate(wrapped[r][c]):
                draw.text((x, y + h + spacing + i * (line_h + spacing)), line, fill="black",
                          font=font)
    return np.asarray(canvas)

"""Image conversion, grids and PNG writing (shared by the CLI, the trainer and evaluation)."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np


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
    """Write one uint8 HxWxC (C in 1, 3, 4) image as PNG, creating the folder."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if image.shape[-1] == 1:
        image = image[..., 0]
    Image.fromarray(image).save(path)
    return path


def save_images(images, path: str, columns: int | None = None) -> str:
    """Save a batch in [-1, 1] as one PNG: the image itself for one, a grid for several."""
    arr = to_uint8(images)
    return save_png(arr[0] if len(arr) == 1 else make_grid(arr, columns), path)


def caption_list(prompts: Sequence[str], batch: int) -> list[str]:
    """Repeat/cycle prompts to fill a batch."""
    return [prompts[i % len(prompts)] for i in range(batch)]


def labelled_grid(images: np.ndarray, labels: Sequence[Sequence[str]], pad: int = 4,
                  label_height: int = 28) -> np.ndarray:
    """(R, C, H, W, 3) uint8 -> one image, row r column c captioned labels[r][c] (two short lines)."""
    from PIL import Image, ImageDraw

    rows, cols, h, w, _ = images.shape
    max_chars = max(16, w // 6)  # PIL's default bitmap font is ~6 px per character
    cell_w, cell_h = max(w, 6 * max_chars), h + label_height
    canvas = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        for c in range(cols):
            x, y = pad + c * (cell_w + pad), pad + r * (cell_h + pad)
            canvas.paste(Image.fromarray(images[r, c]), (x, y))
            text = str(labels[r][c])
            lines = [text[i:i + max_chars] for i in range(0, min(len(text), 2 * max_chars), max_chars)]
            draw.multiline_text((x, y + h + 2), "\n".join(lines), fill="black", spacing=1)
    return np.asarray(canvas)

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

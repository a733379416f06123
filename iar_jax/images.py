"""uint8 images and PNG grids: the one conversion from the models' [-1, 1] range, and the one grid
layout behind sample grids, reconstruction grids and the demo's labelled class grid."""
from __future__ import annotations

import os

import numpy as np


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 as the reference samplers write samples (LlamaGen / IAR sample_ddp.py):
    clamp(127.5·x + 128, 0, 255), truncated, i.e. (x + 1)·127.5 rounded half up."""
    return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def make_grid(images, ncols: int = 8, pad: int = 0, fill: int = 0) -> np.ndarray:
    """uint8 [N, H, W, C] -> one [rows·(H + pad) + pad, ncols·(W + pad) + pad, C] image, row-major;
    `fill` in the gaps and in the empty cells of the last row."""
    x = np.asarray(images)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N, H, W, C] images (see images.to_uint8); got {x.dtype} {x.shape}")
    n, h, w, c = x.shape
    ncols = max(1, min(ncols, n))
    grid = np.full((-(-n // ncols) * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    return grid


def save_png(path: str, image: np.ndarray) -> str:
    """uint8 [H, W, C] (C = 1 or 3) -> PNG at `path` (its folder is created)."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def save_grid(path: str, images, ncols: int = 8, pad: int = 0, fill: int = 0) -> str:
    return save_png(path, make_grid(images, ncols, pad, fill))

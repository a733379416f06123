"""Reconstruction metrics and image grids: PSNR, SSIM, codebook usage, PNG grids.

Images are [N, H, W, C] arrays in [-1, 1] (the tokenizer's range); metrics are computed on the
[0, 1] range (data range 1). PSNR and SSIM are means over images; SSIM follows Wang et al. 2004
(11×11 Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03, channels averaged).
"""
from __future__ import annotations

import os


import numpy as np

from iar_jax.tokenizer.quantizer import codebook_usage  # noqa: F401  (re-exported: metric helpers in one place)


def to_unit(images) -> np.ndarray:
    """[-1, 1] -> [0, 1], float64, clipped."""
    return np.clip((np.asarray(images, np.float64) + 1.0) / 2.0, 0.0, 1.0)


def _check_pair(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two [N, H, W, C] batches of the same shape; got {a.shape} and {b.shape}")
    return a, b


def psnr_per_image(originals, reconstructions) -> np.ndarray:
    a, b = _check_pair(originals, reconstructions)
    mse = np.mean((to_unit(a) - to_unit(b)) ** 2, axis=(1, 2, 3))
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


def psnr(originals, reconstructions) -> float:
    """Mean over images of 10·log10(1 / MSE) on the [0, 1] range."""
    return float(np.mean(psnr_per_image(originals, reconstructions)))


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """Valid-mode separable Gaussian filter over axes 1 and 2 of [N, H, W, C] (11 taps for σ 1.5)."""
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    n = len(k)
    h = sum(k[i] * x[:, i:x.shape[1] - n + 1 + i] for i in range(n))
    return sum(k[i] * h[:, :, i:h.shape[2] - n + 1 + i] for i in range(n))


def ssim_per_image(originals, reconstructions) -> np.ndarray:
    a, b = _check_pair(originals, reconstructions)
    x, y = to_unit(a), to_unit(b)
    if min(x.shape[1:3]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels; got {x.shape[1]}x{x.shape[2]}")
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _gaussian_filter(x), _gaussian_filter(y)
    sxx = _gaussian_filter(x * x) - mx * mx
    syy = _gaussian_filter(y * y) - my * my
    sxy = _gaussian_filter(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return np.mean(s, axis=(1, 2, 3))


def ssim(originals, reconstructions) -> float:
    return float(np.mean(ssim_per_image(originals, reconstructions)))


def to_uint8(images) -> np.ndarray:
    return np.round(to_unit(images) * 255.0).astype(np.uint8)


def make_grid(images, ncols: int = 8, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one uint8 HxWx3 grid (grayscale repeated to RGB)."""
    x = to_uint8(images)
    if x.ndim != 4:
        raise ValueError(f"expected [N, H, W, C] images; got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n, h, w, c = x.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    return grid


def side_by_side(originals, reconstructions) -> np.ndarray:
    """Interleaves pairs: original_0, reconstruction_0, original_1, ... (for a grid with even ncols)."""
    a, b = _check_pair(originals, reconstructions)
    out = np.empty((2 * len(a),) + a.shape[1:], a.dtype)
    out[0::2], out[1::2] = a, b
    return out


def save_png(path: str, grid: np.ndarray) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def save_reconstruction_grid(path: str, originals, reconstructions, pairs_per_row: int = 4) -> str:
    """PNG with originals and reconstructions side by side."""
    return save_png(path, make_grid(side_by_side(originals, reconstructions), ncols=2 * pairs_per_row))

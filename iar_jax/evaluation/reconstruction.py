"""Reconstruction metrics (PSNR, SSIM) and the originals-vs-reconstructions PNG.

Images are [N, H, W, C] arrays in [-1, 1] (the tokenizer's range), compared on [0, 1] (data range 1);
PSNR and SSIM are means over images, computed by scikit-image. SSIM is Wang et al. 2004: 11×11
Gaussian window σ = 1.5 (no sample-covariance correction), K1 = 0.01, K2 = 0.03, channels averaged.
"""
from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from iar_jax import images as image_io


def to_unit(images) -> np.ndarray:
    """[-1, 1] -> [0, 1], float64, clipped."""
    return np.clip((np.asarray(images, np.float64) + 1.0) / 2.0, 0.0, 1.0)


def _unit_pair(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two [N, H, W, C] batches of the same shape; got {a.shape} and {b.shape}")
    return to_unit(a), to_unit(b)


def psnr(originals, reconstructions) -> float:
    """Mean over images of 10·log10(1 / MSE) on the [0, 1] range (inf for an exact reconstruction)."""
    x, y = _unit_pair(originals, reconstructions)
    return float(np.mean([peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x, y)]))


def ssim(originals, reconstructions) -> float:
    x, y = _unit_pair(originals, reconstructions)
    if min(x.shape[1:3]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels; got {x.shape[1]}x{x.shape[2]}")
    return float(np.mean([structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False) for a, b in zip(x, y)]))


def side_by_side(originals, reconstructions) -> np.ndarray:
    """Interleaves pairs: original_0, reconstruction_0, original_1, ... (for a grid with even ncols)."""
    a, b = np.asarray(originals), np.asarray(reconstructions)
    if a.shape != b.shape:
        raise ValueError(f"expected two batches of the same shape; got {a.shape} and {b.shape}")
    out = np.empty((2 * len(a),) + a.shape[1:], a.dtype)
    out[0::2], out[1::2] = a, b
    return out


def save_reconstruction_grid(path: str, originals, reconstructions, pairs_per_row: int = 4) -> str:
    """PNG with originals and reconstructions side by side, on white."""
    return image_io.save_grid(path, image_io.to_uint8(side_by_side(originals, reconstructions)),
                              ncols=2 * pairs_per_row, pad=2, fill=255)

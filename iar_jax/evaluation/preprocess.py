"""Image preprocessing of the FID graph: TF1-legacy bilinear resize to 299x299, then (x - 128) / 128.

The ADM evaluator feeds float32 [0, 255] NHWC images into the graph's `ExpandDims:0`; the graph then
runs `ResizeBilinear` (align_corners=False, half_pixel_centers=False: the TF1 "legacy" rule, which
samples source position i * in/out with no half-pixel shift) and `Sub 128`, `Mul 1/128`. Same here,
with the sample positions and weights computed on the host in float32 exactly as TF's kernel does
(compute_interpolation_weights / compute_lerp in resize_bilinear_op.cc).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from iar_jax.evaluation.inception import INPUT_SIZE


def legacy_interpolation(in_size: int, out_size: int):
    """(lower, upper, lerp) per output index for TF1 legacy bilinear resizing, in TF's float32 math."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale  # float32, like TF's LegacyScaler
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    lerp = (src - floor).astype(np.float32)
    return lower, upper, lerp


@functools.partial(jax.jit, static_argnames="size")
def resize_bilinear_tf1(images, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)):
    """TF1 `ResizeBilinear` (align_corners=False, half_pixel_centers=False) of NHWC images -> float32."""
    x = jnp.asarray(images).astype(jnp.float32)
    h, w = x.shape[1], x.shape[2]
    size = tuple(size)
    if (h, w) == size:
        return x  # TF's weights are then exactly (i, i, 0): identity
    y0, y1, ly = legacy_interpolation(h, size[0])
    x0, x1, lx = legacy_interpolation(w, size[1])
    top, bottom = x[:, y0], x[:, y1]
    tl, tr, bl, br = top[:, :, x0], top[:, :, x1], bottom[:, :, x0], bottom[:, :, x1]
    lx = jnp.asarray(lx)[None, None, :, None]
    ly = jnp.asarray(ly)[None, :, None, None]
    # compute_lerp: top = tl + (tr - tl) * x_lerp; bottom likewise; top + (bottom - top) * y_lerp.
    t = tl + (tr - tl) * lx
    b = bl + (br - bl) * lx
    return t + (b - t) * ly


@jax.jit
def preprocess_images(images):
    """uint8 (or float in [0, 255]) NHWC RGB -> the FID graph's input: 299x299, (x - 128) / 128.

    Grayscale (C = 1) is repeated to RGB; other channel counts are refused.
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {tuple(x.shape)}; "
                         "save samples as uint8 (N, H, W, 3) like the ADM evaluator's arr_0")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear_tf1(x)
    return (x - 128.0) * (1.0 / 128.0)  # Sub 128, Mul 0.0078125 (exact in float32)

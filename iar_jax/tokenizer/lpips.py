"""LPIPS perceptual distance (VGG16 features + learned linear heads), as used by LlamaGen/IAR2.

Reference behaviour kept for parity: inputs in [-1, 1] are shifted/scaled by the fixed
ScalingLayer constants; features are taken after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of
torchvision's VGG16 (`features.{0..29}`, 2×2 max-pools at 4, 9, 16, 23); each feature map is
unit-normalised over channels (eps 1e-10), squared differences go through a bias-free 1×1 conv to
one channel (`lin{i}.model.1`, dropout inactive at eval), are averaged over space and summed.

The weights are never downloaded: the user gives a torchvision `vgg16` state dict and the LPIPS
linear-layer file (`vgg.pth` with `lin{i}.model.1.weight`); `iar_jax.convert.lpips.load_lpips_params`
converts both.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iar_jax.tokenizer.vq_model import Conv

Array = jax.Array

SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
CHANNELS = (64, 128, 256, 512, 512)
# torchvision vgg16.features: (slice, conv indices) up to each LPIPS tap; a max-pool opens slices 2-5.
SLICES = ((1, (0, 2)), (2, (5, 7)), (3, (10, 12, 14)), (4, (17, 19, 21)), (5, (24, 26, 28)))
CONV_OUT = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256, 17: 512, 19: 512, 21: 512, 24: 512, 26: 512, 28: 512}


def _max_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGG16Features(nn.Module):
    """The five LPIPS taps of VGG16; params named `features_{i}` after torchvision's indices."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x) -> Sequence[Array]:
        taps = []
        h = x.astype(self.dtype)
        for s, convs in SLICES:
            if s > 1:
                h = _max_pool(h)
            for i in convs:
                h = nn.relu(Conv(CONV_OUT[i], dtype=self.dtype, name=f"features_{i}")(h))
            taps.append(h)
        return taps


class LPIPS(nn.Module):
    """`lpips(x, y)` -> [B] perceptual distances of two image batches in [-1, 1] (NHWC)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        if x.shape[-1] != 3:
            raise ValueError(f"LPIPS takes RGB images (3 channels); got {x.shape[-1]}: repeat grayscale to 3 channels")
        net = VGG16Features(self.dtype, name="net")
        b = x.shape[0]
        scale = lambda t: (t.astype(jnp.float32) - SHIFT) / SCALE
        feats = net(jnp.concatenate([scale(x), scale(y)], axis=0))
        total = jnp.zeros((b,), jnp.float32)
        for i, f in enumerate(feats):
            f = f.astype(jnp.float32)
            f = f / (jnp.sqrt(jnp.sum(f**2, axis=-1, keepdims=True)) + 1e-10)
            d = (f[:b] - f[b:]) ** 2
            lin = Conv(1, kernel_size=1, padding=0, use_bias=False, dtype=jnp.float32, name=f"lin{i}")(d)
            total = total + jnp.mean(lin, axis=(1, 2, 3))
        return total


@functools.lru_cache(maxsize=1)
def lpips_abstract_params():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda r, a: LPIPS().init(r, a, a), jax.random.key(0), x)["params"]

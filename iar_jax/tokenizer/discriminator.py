"""PatchGAN discriminator (pix2pix `NLayerDiscriminator`, as in LlamaGen/IAR2) and the GAN losses.

conv4×4/s2 + LeakyReLU(0.2); (n_layers - 1) × [conv4×4/s2 (no bias) + BatchNorm + LeakyReLU];
conv4×4/s1 (no bias) + BatchNorm + LeakyReLU; conv4×4/s1 to one logit per patch; all paddings 1.
Init as the reference: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and bias 0.
BatchNorm runs in training mode during tokenizer training (the reference never calls .eval() on
it), so each call normalises with its own batch statistics; running averages live in `batch_stats`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from iar_jax.tokenizer.vq_model import Conv


class PatchGANDiscriminator(nn.Module):
    ndf: int = 64
    n_layers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        w_init = nn.initializers.normal(0.02)
        bn = lambda name: nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
            scale_init=lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d), name=name,
        )
        lrelu = lambda h: nn.leaky_relu(h, 0.2)
        # Module names follow the torch `main.{i}` Sequential indices.
        h = lrelu(Conv(self.ndf, 4, 2, 1, dtype=self.dtype, kernel_init=w_init, name="main_0")(x))
        idx, mult = 2, 1
        for n in range(1, self.n_layers):
            mult = min(2**n, 8)
            h = Conv(self.ndf * mult, 4, 2, 1, use_bias=False, dtype=self.dtype, kernel_init=w_init, name=f"main_{idx}")(h)
            h = lrelu(bn(f"main_{idx + 1}")(h.astype(jnp.float32)).astype(self.dtype))
            idx += 3
        mult = min(2**self.n_layers, 8)
        h = Conv(self.ndf * mult, 4, 1, 1, use_bias=False, dtype=self.dtype, kernel_init=w_init, name=f"main_{idx}")(h)
        h = lrelu(bn(f"main_{idx + 1}")(h.astype(jnp.float32)).astype(self.dtype))
        idx += 3
        return Conv(1, 4, 1, 1, dtype=self.dtype, kernel_init=w_init, name=f"main_{idx}")(h).astype(jnp.float32)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def hinge_gen_loss(logits_fake):
    return -jnp.mean(logits_fake)


def non_saturating_gen_loss(logits_fake):
    # BCE-with-logits against ones.
    return jnp.mean(jax.nn.softplus(-logits_fake))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
G_LOSSES = {"hinge": hinge_gen_loss, "non-saturating": non_saturating_gen_loss}


def adopt_weight(weight: float, step, start: int):
    """The reference's `adopt_weight(w, global_step=step + 1, threshold=start)`: 0 before `start`."""
    return jnp.where(step + 1 >= start, weight, 0.0)

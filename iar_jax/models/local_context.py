"""IAR2 local-context window (SPEC §5): which past trunk outputs feed the head at each position.

For the image token at grid cell (i, j) of an H×W grid the window has 13 slots, in this order:
row i−2 cols j−2..j+2 (5), row i−1 cols j−2..j+2 (5), (i, j−2), (i, j−1), then (i, j) itself.
Slot values are trunk outputs at *sequence* positions: the output at position p is the one that
predicts token p (position 0 is the class token), so a token-grid index is also a sequence index.
Every slot is at or before the current position, hence causal. Slots outside the grid are empty:
the reference fills them with zeros *before* the shared compression MLP (so they contribute
mlp1(0), not 0) — `LocalContext` keeps that.

The index/mask table is static NumPy, built once per grid, and gathered along the sequence.
"""
from __future__ import annotations

import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WINDOW = 13
NUM_NEIGHBOURS = WINDOW - 1
# (row offset, column offset) of each slot, in the reference order.
SLOT_OFFSETS = tuple([(-2, dj) for dj in range(-2, 3)] + [(-1, dj) for dj in range(-2, 3)] + [(0, -2), (0, -1), (0, 0)])

_INIT = nn.initializers.normal(stddev=0.02)


@functools.lru_cache(maxsize=None)
def window_table(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """(index int32 [H·W, 13], mask bool [H·W, 13]); empty slots have index 0 and mask False."""
    if height < 1 or width < 1:
        raise ValueError(f"window grid {height}x{width} is empty; use a grid of at least 1x1 tokens")
    pos = np.arange(height * width)
    i, j = pos // width, pos % width
    di = np.array([o[0] for o in SLOT_OFFSETS])
    dj = np.array([o[1] for o in SLOT_OFFSETS])
    r, c = i[:, None] + di[None], j[:, None] + dj[None]
    mask = (r >= 0) & (c >= 0) & (c < width)  # r < height always: offsets are ≤ 0
    index = np.where(mask, r * width + c, 0).astype(np.int32)
    index.setflags(write=False)
    mask.setflags(write=False)
    return index, mask


def grid_side(num_tokens: int) -> int:
    """Side of the square token grid holding `num_tokens` tokens (one-line error if not square)."""
    side = int(round(num_tokens ** 0.5))
    if num_tokens < 1 or side * side != num_tokens:
        raise ValueError(f"token count {num_tokens} is not a square (H·W with H = W); IAR2 needs square token "
                         "grids, e.g. 256 (16x16) or 576 (24x24)")
    return side


class MLP(nn.Module):
    """Linear(bias) → exact GELU → Linear(optional bias), the reference's `nn.Sequential` MLPs."""

    hidden: int
    out: int
    out_bias: bool = True
    zero_init_out: bool = False
    axes: Tuple = ("embed", "mlp", "embed")  # logical axes of (input, hidden, output)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        a_in, a_hid, a_out = self.axes
        h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=nn.with_logical_partitioning(_INIT, (a_in, a_hid)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (a_hid,)), name="fc1")(x)
        h = nn.gelu(h, approximate=False)  # torch nn.GELU() is the exact erf form
        out_init = nn.initializers.zeros if self.zero_init_out else _INIT
        return nn.Dense(self.out, use_bias=self.out_bias, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=nn.with_logical_partitioning(out_init, (a_hid, a_out)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (a_out,)), name="fc2")(h)


class LocalContext(nn.Module):
    """Window compression: mlp1 (shared over the 12 neighbour slots) then mlp2 → h_ctx.

    mlp1 is applied per trunk output *before* the gather: mlp1(h[idx]) == mlp1(h)[idx], so each
    output is compressed once instead of 12 times, and the sampler keeps a buffer of compressed
    outputs ([B, T, dim//12]) instead of full ones. Empty slots take mlp1(0) as in the reference.
    """

    dim: int
    height: int
    width: int
    dtype: jnp.dtype = jnp.float32

    @property
    def slot_dim(self) -> int:
        return self.dim // 12

    def setup(self):
        d = self.dim
        self.mlp1 = MLP(d // 4, self.slot_dim, out_bias=False, axes=("embed", "mlp", None), dtype=self.dtype)
        self.mlp2 = MLP(2 * d, d, out_bias=False, axes=(None, "mlp", "embed"), dtype=self.dtype)
        index, mask = window_table(self.height, self.width)
        self.index = jnp.asarray(index[:, :NUM_NEIGHBOURS])
        self.mask = jnp.asarray(mask[:, :NUM_NEIGHBOURS])

    def compress(self, h):
        """Per-slot compression of trunk outputs h [..., D] -> [..., dim//12]."""
        return self.mlp1(h)

    def _combine(self, slots, mask):
        """slots [..., 12, c] gathered compressed outputs; mask [..., 12] -> h_ctx [..., D]."""
        empty = self.mlp1(jnp.zeros((self.dim,), self.dtype))  # mlp1 of a zero slot
        slots = jnp.where(mask[..., None], slots, empty.astype(slots.dtype))
        return self.mlp2(slots.reshape(*slots.shape[:-2], NUM_NEIGHBOURS * self.slot_dim))

    def __call__(self, h):
        """Teacher-forced: trunk outputs h [B, T, D] (T = H·W) -> h_ctx [B, T, D]."""
        c = self.compress(h)
        slots = jnp.take(c, self.index, axis=1)  # [B, T, 12, c]
        return self._combine(slots, self.mask[None])

    def at(self, buffer, pos):
        """Sampling: buffer [B, S, c] of compressed outputs filled up to `pos` -> h_ctx [B, D]."""
        idx = jax.lax.dynamic_index_in_dim(self.index, pos, axis=0, keepdims=False)
        mask = jax.lax.dynamic_index_in_dim(self.mask, pos, axis=0, keepdims=False)
        slots = jnp.take(buffer, idx, axis=1)  # [B, 12, c]
        return self._combine(slots, mask[None])

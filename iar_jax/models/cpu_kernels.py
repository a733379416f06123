"""XLA:CPU-specific programs, chosen with `model.kernels = "xla_cpu"` (never by the host backend).

Same values as the default path up to fp32 summation order; only the layouts XLA:CPU is given change:
  * `cpu_dot_general`: the Dense layers' dot_general, whose VJP makes each weight gradient a plain
    [in, rows] @ [rows, out] product;
  * `causal_attention`: causal softmax attention whose VJP is written out as batched matmuls;
  * `OutMajorDense` / `transpose_kernels`: the samplers' decode kernels stored output-major, with the
    few-row products of a decode step computed as a multiply-reduce.
Entry points (the CLI, the benchmarks) pick these only when the devices they compile for are CPUs
(`iar_jax.runtime.resolve_kernels`); GPU and TPU compilers choose layouts themselves.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iar_jax.models.attention import causal_probs

_INIT = nn.initializers.normal(stddev=0.02)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_product(x, w, k):
    return jnp.tensordot(x, w, k)


def _dense_product_fwd(x, w, k):
    return jnp.tensordot(x, w, k), (x, w)


def _dense_product_bwd(k, res, g):
    x, w = res
    nl, no = x.ndim - k, w.ndim - k  # x [*lead, *in], w [*in, *out], g [*lead, *out]
    bar = jax.lax.optimization_barrier
    # The weight gradient contracts the rows (the lead axes), the major axes of both operands.
    # Left alone, XLA:CPU transposes one operand inside the fusion that produces it (strided
    # writes, ~1 GB/s) or falls back to a slower dot; an explicit transpose of the smaller of x and
    # g, kept apart from the product by a barrier, makes it a plain [in, rows] @ [rows, out] product.
    if np.prod(x.shape[nl:]) <= np.prod(g.shape[nl:]):
        dw = jnp.tensordot(bar(jnp.moveaxis(x, range(nl), range(k, k + nl))), g, nl)
    else:
        dwt = bar(jnp.tensordot(bar(jnp.moveaxis(g, range(nl), range(no, no + nl))), x, nl))  # [*out, *in]
        dw = jnp.moveaxis(dwt, range(no), range(k, k + no))
    dx = jnp.tensordot(g, w, (tuple(range(nl, nl + no)), tuple(range(k, k + no))))
    return dx, dw


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)


def cpu_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general for a bias-free Dense (lhs trailing axes x kernel leading axes, no batch
    axes) with the weight gradient laid out for XLA:CPU's matmul (`_dense_product_bwd`); other
    contractions go to lax.dot_general unchanged. No reshapes, so sharded kernel axes stay put."""
    (lc, rc), (lb, rb) = dimension_numbers
    k = len(lc)
    if (lb or rb or precision is not None or preferred_element_type is not None
            or tuple(lc) != tuple(range(lhs.ndim - k, lhs.ndim)) or tuple(rc) != tuple(range(k))):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return _dense_product(lhs, rhs, k)


@jax.custom_vjp
def causal_attention(q, k, v):
    """Causal softmax attention over head-major q, k, v [B, H, L, Dh] -> [B, H, L, Dh], fp32
    softmax. Its VJP is written out (the softmax backward over the saved probabilities) so every
    product is a plain batched matmul; XLA:CPU's own VJP transposes operands in between."""
    return _causal_attention_fwd(q, k, v)[0]


def _causal_attention_fwd(q, k, v):
    p = causal_probs(q, k)
    return jnp.einsum("bhls,bhsd->bhld", p.astype(v.dtype), v), (q, k, v, p)


def _causal_attention_bwd(res, g):
    q, k, v, p = res
    dt = v.dtype
    dv = jnp.einsum("bhls,bhld->bhsd", p.astype(dt), g)
    dp = jnp.einsum("bhld,bhsd->bhls", g, v).astype(jnp.float32)
    ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) / np.sqrt(q.shape[-1]).astype(np.float32)).astype(dt)
    return jnp.einsum("bhls,bhsd->bhld", ds, k), jnp.einsum("bhls,bhld->bhsd", ds, q), dv


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


class OutMajorDense(nn.Module):
    """Bias-free DenseGeneral over the last `n_in` axes with its kernel stored output-major, as
    `kernel_t` [*features, *in] (`axes`: the input-major logical names). Up to `max_reduce_rows`
    rows (a decode step) it is a multiply-reduce with the rows innermost, which XLA:CPU's reduce
    library fusion runs as one streaming pass over the kernel: 1.5-2x the bandwidth of the dot
    (measured on fp32 8-row products; see benchmarks/sample_speed.py)."""

    features: Tuple[int, ...]
    axes: Tuple[Optional[str], ...]
    n_in: int
    dtype: Any = jnp.float32
    max_reduce_rows: int = 32

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in:]
        kernel = self.param("kernel_t", nn.with_logical_partitioning(
            _INIT, self.axes[self.n_in:] + self.axes[:self.n_in]), self.features + in_shape, jnp.float32)
        lead = x.shape[:x.ndim - self.n_in]
        xf = x.reshape(-1, int(np.prod(in_shape))).astype(self.dtype)
        w = kernel.reshape(-1, xf.shape[1]).astype(self.dtype)
        if xf.shape[0] <= self.max_reduce_rows:
            y = jnp.sum(w[:, None, :].astype(jnp.float32) * xf[None].astype(jnp.float32), axis=-1).T
        else:
            y = jnp.einsum("bk,nk->bn", xf, w, preferred_element_type=jnp.float32)
        return y.astype(self.dtype).reshape(lead + self.features)


def transpose_kernels(params, out_major_shapes):
    """Training (input-major) params -> the output-major decode layout given by `out_major_shapes`
    (the out-major model's abstract params): each `kernel` [*in, *out] whose module is an
    OutMajorDense becomes `kernel_t` [*out, *in], and a FeedForward's w1 and w3 become one w13
    [2, ffn, dim] (two sibling reductions over one input fall off XLA:CPU's fast reduce path)."""
    def rotate(x, target, name):
        fits = [n for n in range(1, x.ndim) if x.shape[n:] + x.shape[:n] == target.shape]
        if len(fits) != 1:
            raise ValueError(f"kernel {name} of shape {x.shape} does not map to the out-major shape {target.shape}; "
                             "pass params of the same model config")
        return jnp.transpose(x, tuple(range(fits[0], x.ndim)) + tuple(range(fits[0])))

    def walk(p, s, name):
        if not isinstance(s, dict):
            return p
        p = dict(p)
        if "w13" in s and "w13" not in p:
            p["w13"] = {"kernel": jnp.stack([p.pop("w1")["kernel"], p.pop("w3")["kernel"]], axis=1)}
        if "kernel_t" in s and "kernel" in p:
            p["kernel_t"] = rotate(p.pop("kernel"), s["kernel_t"], name)
        return {k: walk(v, s[k], f"{name}/{k}") if k in s else v for k, v in p.items()}

    return walk(params, out_major_shapes, "")

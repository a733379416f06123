"""LlamaGen's class-conditional GPT (the AR transformer of IAR and IAR2), in Flax Linen.

Pre-norm decoder with RMSNorm, fused-qkv attention with 2D RoPE, SwiGLU FFN, no biases, a class
token in front of the image tokens. Parameter names and layouts mirror the PyTorch modules so the
converter (`iar_jax.convert.gpt`) is a set of transposes and reshapes.

Three entry points share one set of blocks:
  * `__call__(codes, labels, train)`: teacher-forced training forward, logits [B, T, V] (fp32);
  * `prefill(labels, cache)`: class token(s) into a fresh fixed-size KV cache;
  * `decode(tokens, pos, cache)`: one image token at sequence position `pos`.
The KV cache is an explicit pytree {'k', 'v'}, head-major: stacked [n_layer, B, H, S, Dh] arrays
when the layers are nn.scan-ned, else tuples of n_layer [B, H, S, Dh] arrays (one buffer per layer,
so a decode step slices nothing). A `lax.scan` sampler carries it; each step writes its position
in place (`_write_kv`) after the attention has read the old entries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Cache = Dict[str, Array]

_INIT = nn.initializers.normal(stddev=0.02)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 16384
    num_classes: int = 1000
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    grid_size: int = 16  # image tokens form a grid_size x grid_size grid
    cls_token_num: int = 1
    multiple_of: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    token_dropout: float = 0.1
    attn_dropout: float = 0.0
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    drop_path: float = 0.0
    class_dropout: float = 0.1
    dtype: str = "float32"  # compute dtype; params are always fp32
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots (save matmul outputs)
    # Dense kernels stored output-major [out..., in...] (`OutMajorDense`): the CPU samplers' decode
    # layout, made from the training (input-major) params by `transpose_kernels`.
    out_major_kernels: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_dim(self) -> int:
        # LlamaGen: int(2 * 4d / 3) rounded up to a multiple of 256.
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def seq_len(self) -> int:
        return self.cls_token_num + self.num_tokens

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def validate(self) -> "GPTConfig":
        if self.dim % self.n_head:
            raise ValueError(f"model dim {self.dim} is not divisible by n_head {self.n_head}; pick n_head dividing dim")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 for 2D RoPE; change dim or n_head")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat={self.remat!r} is not one of none|full|dots")
        return self


# ----------------------------------------------------------------------------------------------
# 2D rotary embedding


def rope_table_2d(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> np.ndarray:
    """[cls_token_num + grid², head_dim/2, 2] (cos, sin) table, LlamaGen's `precompute_freqs_cis_2d`.

    The first half of the rotated pairs uses the row index, the second the column index. The class
    rows are all zeros (cos = sin = 0), which zeroes q and k there; kept for checkpoint parity.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (np.arange(0, half, 2)[: half // 2].astype(np.float32) / half))
    t = np.arange(grid_size, dtype=np.float32)
    f = np.outer(t, freqs).astype(np.float32)  # [G, head_dim/4]
    rows = np.broadcast_to(f[:, None, :], (grid_size, grid_size, f.shape[1]))
    cols = np.broadcast_to(f[None, :, :], (grid_size, grid_size, f.shape[1]))
    grid = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, half)
    table = np.stack([np.cos(grid), np.sin(grid)], axis=-1).astype(np.float32)
    return np.concatenate([np.zeros((cls_token_num, half, 2), np.float32), table], axis=0)


def apply_rope(x: Array, rope: Array) -> Array:
    """x [B, L, H, Dh]; rope [L, Dh/2, 2] (or [B, L, Dh/2, 2]). Adjacent (even, odd) pairs rotate."""
    dtype = x.dtype
    x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    if rope.ndim == 3:
        rope = rope[None]
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(*out.shape[:-2], -1).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # Reference: norm in fp32, cast back to the input dtype, then scale.
        return (y.astype(self.dtype) * scale.astype(self.dtype)).astype(self.dtype)


_CPU_LAYOUTS: Optional[bool] = None


def use_cpu_layouts() -> bool:
    """Trace-time switch for the XLA:CPU-specific programs: the hand-written training VJPs below
    (`cpu_dot_general`, `causal_attention`) and the samplers' output-major decode kernels
    (`OutMajorDense`, chosen in `iar_jax.sampling.gpt_step.decode_model`). On for the cpu backend
    only (GPU/TPU compilers choose layouts themselves) unless `cpu_layouts(...)` says otherwise."""
    return jax.default_backend() == "cpu" if _CPU_LAYOUTS is None else _CPU_LAYOUTS


@contextlib.contextmanager
def cpu_layouts(enabled: bool):
    """Trace with the CPU-specific programs on or off, e.g. off to compile on CPU what an accelerator runs."""
    global _CPU_LAYOUTS
    old, _CPU_LAYOUTS = _CPU_LAYOUTS, enabled
    try:
        yield
    finally:
        _CPU_LAYOUTS = old


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
    contractions go to lax.dot_general unchanged. Same values up to fp32 summation order. No
    reshapes, so sharded kernel axes (heads) stay as they are."""
    (lc, rc), (lb, rb) = dimension_numbers
    k = len(lc)
    if (lb or rb or precision is not None or preferred_element_type is not None
            or tuple(lc) != tuple(range(lhs.ndim - k, lhs.ndim)) or tuple(rc) != tuple(range(k))):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return _dense_product(lhs, rhs, k)


def _dense(features, axes, name, dtype, in_axis=-1, kernel_init=_INIT, out_major=False):
    if out_major:
        n_in = 1 if isinstance(in_axis, int) else len(in_axis)
        return OutMajorDense(features if isinstance(features, tuple) else (features,), tuple(axes), n_in, dtype,
                             name=name)
    return nn.DenseGeneral(
        features=features,
        axis=in_axis,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        dot_general=cpu_dot_general if use_cpu_layouts() else None,
        name=name,
    )


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
    """Training (input-major) params -> the `out_major_kernels` layout given by `out_major_shapes`
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


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


def _causal_probs(q, k):
    """Softmax (fp32) of the causal scores of queries q [B, H, Lq, Dh], the last Lq of the keys
    k [B, H, S, Dh], over the keys: [B, H, Lq, S]."""
    lq, S = q.shape[2], k.shape[2]
    s = jnp.einsum("bhld,bhsd->bhls", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1]).astype(np.float32)
    causal = jnp.arange(S)[None, :] <= jnp.arange(S - lq, S)[:, None]
    return jax.nn.softmax(jnp.where(causal, s, jnp.finfo(jnp.float32).min), axis=-1)


@jax.custom_vjp
def causal_attention(q, k, v):
    """Causal softmax attention over head-major q, k, v [B, H, L, Dh] -> [B, H, L, Dh], fp32
    softmax. Its VJP is written out (the softmax backward over the saved probabilities) so every
    product is a plain batched matmul; XLA:CPU's own VJP transposes operands in between."""
    return _causal_attention_fwd(q, k, v)[0]


def _causal_attention_fwd(q, k, v):
    p = _causal_probs(q, k)
    return jnp.einsum("bhls,bhsd->bhld", p.astype(v.dtype), v), (q, k, v, p)


def _causal_attention_bwd(res, g):
    q, k, v, p = res
    dt = v.dtype
    dv = jnp.einsum("bhls,bhld->bhsd", p.astype(dt), g)
    dp = jnp.einsum("bhld,bhsd->bhls", g, v).astype(jnp.float32)
    ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) / np.sqrt(q.shape[-1]).astype(np.float32)).astype(dt)
    return jnp.einsum("bhls,bhsd->bhld", ds, k), jnp.einsum("bhls,bhld->bhsd", ds, q), dv


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


class Attention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, rope, *, train: bool, cache_kv=None, start=None):
        """x [B, L, D]. Without a cache: causal self-attention over x. With `cache_kv=(k, v)`
        ([B, H, S, Dh] each, READ ONLY) the queries at positions start .. start+L-1 attend to the
        cached positions < start and causally to the L new keys. Returns (out, the new (k, v)
        [B, H, L, Dh] for the caller to write at `start` (None without a cache), attention of the
        last query to key 0 — the class token — averaged over heads [B])."""
        cfg = self.cfg
        dt = cfg.compute_dtype
        qkv = _dense((3, cfg.n_head, cfg.head_dim), ("embed", None, "heads", "kv"), "wqkv", dt,
                     out_major=cfg.out_major_kernels)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        q = _constrain(q, ("batch", "length", "heads", "kv"))
        k = _constrain(k, ("batch", "length", "heads", "kv"))
        v = _constrain(v, ("batch", "length", "heads", "kv"))
        L = x.shape[1]
        neg = jnp.finfo(jnp.float32).min
        # Head-major operands: batched products over (B, H); the decode reads the cache in its own layout.
        qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, H, L, Dh]
        if cache_kv is None:
            if use_cpu_layouts() and not (train and cfg.attn_dropout > 0):
                out = causal_attention(qh, kh, vh)
                # The probabilities stay inside the core's VJP; only the last query's row is needed here.
                attn0 = jnp.mean(_causal_probs(qh[:, :, -1:], kh)[:, :, 0, 0], axis=1)
            else:
                probs = _causal_probs(qh, kh)
                attn0 = jnp.mean(probs[:, :, -1, 0], axis=1)  # last query -> class key, head-mean
                if cfg.attn_dropout > 0:
                    probs = nn.Dropout(cfg.attn_dropout)(probs, deterministic=not train)
                out = jnp.einsum("bhls,bhsd->bhld", probs.astype(dt), vh)
            out = jnp.swapaxes(out, 1, 2)
            new_kv = None
        else:
            ck, cv = cache_kv
            S = ck.shape[2]
            inv = np.float32(1.0 / np.sqrt(cfg.head_dim))
            s_old = jnp.einsum("bhld,bhsd->bhls", qh, ck.astype(dt)).astype(jnp.float32) * inv
            s_old = jnp.where((jnp.arange(S) < start)[None, None, None, :], s_old, neg)
            s_new = jnp.einsum("bhld,bhmd->bhlm", qh, kh).astype(jnp.float32) * inv
            s_new = jnp.where((jnp.arange(L)[None, :] <= jnp.arange(L)[:, None])[None, None], s_new, neg)
            probs = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1)  # fp32 softmax
            p_old, p_new = probs[..., :S], probs[..., S:]
            # Key 0 (the class token) is in the cache once start > 0, else the first new key.
            attn0 = jnp.mean(jnp.where(start > 0, p_old[:, :, -1, 0], p_new[:, :, -1, 0]), axis=1)
            out = (jnp.einsum("bhls,bhsd->blhd", p_old.astype(dt), cv.astype(dt))
                   + jnp.einsum("bhlm,bhmd->blhd", p_new.astype(dt), vh))
            new_kv = (kh, vh)
        out = _dense(cfg.dim, ("heads", "kv", "embed"), "wo", dt, in_axis=(-2, -1),
                     out_major=cfg.out_major_kernels)(out)
        out = nn.Dropout(cfg.resid_dropout)(out, deterministic=not train)
        return out, new_kv, attn0


class FeedForward(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, *, train: bool):
        cfg = self.cfg
        dt = cfg.compute_dtype
        if cfg.out_major_kernels:  # w1 and w3 as one kernel (`transpose_kernels`)
            h13 = _dense((2, cfg.ffn_dim), ("embed", None, "mlp"), "w13", dt, out_major=True)(x)
            h1, h3 = h13[..., 0, :], h13[..., 1, :]
        else:
            h1 = _dense(cfg.ffn_dim, ("embed", "mlp"), "w1", dt)(x)
            h3 = _dense(cfg.ffn_dim, ("embed", "mlp"), "w3", dt)(x)
        h = _constrain(nn.silu(h1) * h3, ("batch", "length", "mlp"))
        out = _dense(cfg.dim, ("mlp", "embed"), "w2", dt, out_major=cfg.out_major_kernels)(h)
        return nn.Dropout(cfg.ffn_dropout)(out, deterministic=not train)


def drop_path(x, rate, rng):
    """Stochastic depth: drop the residual branch per sample with probability `rate` (may be traced)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def drop_path_rate(cfg: GPTConfig, layer, n_layer: int):
    # LlamaGen: torch.linspace(0, drop_path_rate, n_layer), one rate per layer.
    return cfg.drop_path * layer / max(n_layer - 1, 1)


class TransformerBlock(nn.Module):
    cfg: GPTConfig
    train: bool = False  # an attribute, not a call arg, so nn.remat never traces it

    @nn.compact
    def __call__(self, x, rope, cache_kv=None, start=None, drop_rate=0.0):
        cfg, train = self.cfg, self.train
        use_dp = train and cfg.drop_path > 0
        h, new_cache, attn0 = Attention(cfg, name="attention")(
            RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attention_norm")(x), rope,
            train=train, cache_kv=cache_kv, start=start)
        x = x + (drop_path(h, drop_rate, self.make_rng("dropout")) if use_dp else h)
        h = FeedForward(cfg, name="feed_forward")(RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="ffn_norm")(x), train=train)
        x = x + (drop_path(h, drop_rate, self.make_rng("dropout")) if use_dp else h)
        return _constrain(x, ("batch", "length", "embed")), new_cache, attn0


def _remat(block_cls, policy: str):
    if policy == "none":
        return block_cls
    pol = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(block_cls, policy=pol, prevent_cse=True)


class _ScanBody(nn.Module):
    """One layer applied inside nn.scan. The stacked cache rides in the carry READ ONLY; the layer's
    new keys/values come out as scan outputs and the stack writes them all after the loop."""

    cfg: GPTConfig
    train: bool
    n_layer: int

    @nn.compact
    def __call__(self, carry, _):
        x, rope, cache, start, layer = carry
        block = _remat(TransformerBlock, self.cfg.remat)(self.cfg, self.train, name="block")
        rate = drop_path_rate(self.cfg, layer, self.n_layer)
        if cache is None:
            x, _, attn0 = block(x, rope, None, None, rate)
            return (x, rope, cache, start, layer + 1), (attn0, None)
        x, new_kv, attn0 = block(x, rope, (cache["k"][layer], cache["v"][layer]), start, rate)
        return (x, rope, cache, start, layer + 1), (attn0, new_kv)


class TransformerStack(nn.Module):
    """n_layer blocks (optionally nn.scan-ned and remat-ed) followed by the final RMSNorm
    (`final_norm=False`: none, e.g. the IAR2 trunk, whose raw outputs feed its window and head)."""

    cfg: GPTConfig
    n_layer: Optional[int] = None
    final_norm: bool = True

    @nn.compact
    def __call__(self, x, rope, *, train: bool, cache: Optional[Cache] = None, start=0):
        cfg = self.cfg
        n = self.n_layer or cfg.n_layer
        if cfg.scan_layers:
            scanned = nn.scan(
                _ScanBody,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=n,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, train, n, name="layers")
            start = jnp.asarray(start, jnp.int32)
            (x, _, _, _, _), (attn0, new_kv) = scanned((x, rope, cache, start, jnp.int32(0)), None)
            attn0 = attn0[-1]
            if cache is not None:
                cache = {"k": _write_kv(cache["k"], new_kv[0], start, x, axis=3),
                         "v": _write_kv(cache["v"], new_kv[1], start, x, axis=3)}
        else:
            block_cls = _remat(TransformerBlock, cfg.remat)
            drop_rate_i = lambda i: drop_path_rate(cfg, i, n)  # noqa: E731
            ks, vs = (list(cache["k"]), list(cache["v"])) if cache is not None else (None, None)
            for i in range(n):
                kv = None if cache is None else (ks[i], vs[i])
                x, new_kv, attn0 = block_cls(cfg, train, name=f"layers_{i}")(x, rope, kv, start, drop_rate_i(i))
                if cache is not None:
                    ks[i] = _write_kv(ks[i], new_kv[0], start, x, axis=2)
                    vs[i] = _write_kv(vs[i], new_kv[1], start, x, axis=2)
            if cache is not None:
                cache = {"k": tuple(ks), "v": tuple(vs)}
        if self.final_norm:
            x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="norm")(x)
        return x, cache, attn0


def _write_kv(buf: Array, new: Array, start, after: Array, axis: int) -> Array:
    """Writes `new` into `buf` at position `start` along the sequence `axis`, in place.

    `after` (an activation computed from every read of `buf`) is folded in as `+ 0·sum(after)`: the
    write then depends on the reads, so XLA updates the buffer in place instead of copying the
    whole cache to keep its old value alive (0·x is not folded for floats; an
    optimization_barrier does not create this dependency).
    """
    zero = jnp.sum(after[..., :1].astype(jnp.float32)) * 0.0
    idx = [0] * buf.ndim
    idx[axis] = start
    return jax.lax.dynamic_update_slice(buf, (new + zero.astype(new.dtype)).astype(buf.dtype), tuple(idx))


def init_cache(cfg: GPTConfig, batch: int, max_len: Optional[int] = None, dtype=None, n_layer=None) -> Cache:
    """Zeroed fixed-size KV cache {'k', 'v'}, head-major: [n_layer, batch, n_head, max_len, head_dim]
    arrays for nn.scan-ned layers, else tuples of n_layer [batch, n_head, max_len, head_dim] arrays."""
    n = n_layer or cfg.n_layer
    shape = (batch, cfg.n_head, max_len or cfg.seq_len, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    if cfg.scan_layers:
        return {"k": jnp.zeros((n,) + shape, dtype), "v": jnp.zeros((n,) + shape, dtype)}
    return {"k": tuple(jnp.zeros(shape, dtype) for _ in range(n)),
            "v": tuple(jnp.zeros(shape, dtype) for _ in range(n))}


class LabelEmbedder(nn.Module):
    """Class embedding with a null row (index num_classes) used by label dropout and CFG."""

    num_classes: int
    dim: int
    dropout: float

    @nn.compact
    def __call__(self, labels, *, train: bool):
        table = self.param(
            "embedding_table", nn.with_logical_partitioning(_INIT, ("classes", "embed")), (self.num_classes + 1, self.dim))
        if train and self.dropout > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout
            labels = jnp.where(drop, self.num_classes, labels)
        return jnp.take(table, labels, axis=0)


class GPT(nn.Module):
    cfg: GPTConfig

    def setup(self):
        cfg = self.cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout)
        self.tok_embeddings = nn.Embed(
            cfg.vocab_size, cfg.dim, embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")),
            param_dtype=jnp.float32)
        self.transformer = TransformerStack(cfg)
        self.output = _dense(cfg.vocab_size, ("embed", "vocab"), "output", cfg.compute_dtype,
                             kernel_init=nn.initializers.zeros, out_major=cfg.out_major_kernels)
        self.token_drop = nn.Dropout(cfg.token_dropout)
        self.rope = jnp.asarray(rope_table_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num))

    def _logits(self, h):
        return _constrain(self.output(h).astype(jnp.float32), ("batch", "length", "vocab"))

    def _cls(self, labels, train):
        # One class token per cls_token_num slot (c2i uses a single one).
        e = self.cls_embedding(labels, train=train)[:, None, :]
        return jnp.repeat(e, self.cfg.cls_token_num, axis=1)

    def __call__(self, codes: Array, labels: Array, *, train: bool = False) -> Array:
        """codes [B, T] int, labels [B] int -> logits [B, T, V] (fp32); position t predicts codes[:, t]."""
        cfg = self.cfg
        x = jnp.concatenate([self._cls(labels, train), self.tok_embeddings(codes[:, :-1])], axis=1)
        x = self.token_drop(x.astype(cfg.compute_dtype), deterministic=not train)
        x = _constrain(x, ("batch", "length", "embed"))
        h, _, _ = self.transformer(x, self.rope[: x.shape[1]], train=train)
        return self._logits(h[:, cfg.cls_token_num - 1:])

    def prefill(self, labels: Array, cache: Cache) -> Tuple[Array, Cache, Array]:
        """Class token(s) at positions [0, cls_token_num) -> logits of the first image token [B, V]."""
        cfg = self.cfg
        x = self._cls(labels, False).astype(cfg.compute_dtype)
        h, cache, attn0 = self.transformer(x, self.rope[: cfg.cls_token_num], train=False, cache=cache, start=0)
        return self._logits(h[:, -1:])[:, 0], cache, attn0

    def decode(self, tokens: Array, pos: Array, cache: Cache) -> Tuple[Array, Cache, Array]:
        """Image token ids [B] at sequence position `pos` -> next-token logits [B, V], cache, and the
        last layer's head-mean attention weight to the class key [B]."""
        x = self.tok_embeddings(tokens)[:, None, :].astype(self.cfg.compute_dtype)
        rope = jax.lax.dynamic_slice_in_dim(self.rope, pos, 1, axis=0)
        h, cache, attn0 = self.transformer(x, rope, train=False, cache=cache, start=pos)
        return self._logits(h)[:, 0], cache, attn0


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


@functools.lru_cache(maxsize=None)
def abstract_params(cfg: GPTConfig):
    """The params tree as ShapeDtypeStructs (unboxed), without allocating."""
    model = GPT(cfg)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.num_tokens), jnp.int32), jnp.zeros((1,), jnp.int32)))
    return nn.unbox(shapes)["params"]

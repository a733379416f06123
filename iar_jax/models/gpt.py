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

`kernels` and `attention` are model settings (hashable config fields, so part of every jit key):
the default path is the one accelerators run; `kernels="xla_cpu"` swaps in the XLA:CPU-specific
programs of `iar_jax.models.cpu_kernels`, and attention kernels live in `iar_jax.models.attention`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iar_jax.models import attention as attn_lib
from iar_jax.models import cpu_kernels

Array = jax.Array
Cache = Dict[str, Array]

_INIT = nn.initializers.normal(stddev=0.02)


KERNELS = ("xla", "xla_cpu")


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
    # "xla": the programs accelerators run (default, what the tests exercise). "xla_cpu": the
    # XLA:CPU-tuned VJPs and decode kernels of `cpu_kernels`, same values; entry points pick it only
    # when they compile for CPU devices (`runtime.resolve_kernels`).
    kernels: str = "xla"
    attention: str = "dot_product"  # dot_product | pallas_flash (TPU); see `iar_jax.models.attention`
    # Dense kernels stored output-major [out..., in...] (`cpu_kernels.OutMajorDense`): the CPU
    # decode layout, made from the training params by `cpu_kernels.transpose_kernels`.
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
        if self.kernels not in KERNELS:
            raise ValueError(f"model.kernels={self.kernels!r} is not one of {'|'.join(KERNELS)}")
        if self.attention not in attn_lib.IMPLEMENTATIONS:
            raise ValueError(f"model.attention={self.attention!r} is not one of {'|'.join(attn_lib.IMPLEMENTATIONS)}")
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


class Dense(nn.Module):
    """Bias-free dense layer over the last `n_in` axes, kernel [*in, *features] (fp32, logical
    `axes`), computed in `dtype`. Same params as nn.DenseGeneral, but the kernel is created in its
    own shape: DenseGeneral makes it flat and reshapes, and under a mesh the flat array's logical
    constraint (one name per kernel axis) fails."""

    features: Tuple[int, ...]
    axes: Tuple[Optional[str], ...]
    n_in: int = 1
    dtype: Any = jnp.float32
    kernel_init: Any = _INIT
    dot_general: Any = None

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in:]
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            in_shape + self.features, jnp.float32)
        dims = ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ()))
        return (self.dot_general or jax.lax.dot_general)(x.astype(self.dtype), kernel.astype(self.dtype), dims)


def _dense(features, axes, name, cfg, in_axis=-1, kernel_init=_INIT):
    features = features if isinstance(features, tuple) else (features,)
    n_in = 1 if isinstance(in_axis, int) else len(in_axis)
    if cfg.out_major_kernels:
        return cpu_kernels.OutMajorDense(features, tuple(axes), n_in, cfg.compute_dtype, name=name)
    return Dense(features, tuple(axes), n_in, cfg.compute_dtype, kernel_init,
                 cpu_kernels.cpu_dot_general if cfg.kernels == "xla_cpu" else None, name=name)


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


class Attention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, rope, *, train: bool, cache_kv=None, start=None, prefill: bool = False):
        """x [B, L, D]. Without a cache: causal self-attention over x. With `cache_kv=(k, v)`
        ([B, H, S, Dh] each, READ ONLY) the queries at positions start .. start+L-1 attend to the
        cached positions < start and causally to the L new keys; `prefill` (start is 0) skips the
        empty cache. Returns (out, the new (k, v) [B, H, L, Dh] for the caller to write at `start`
        (None without a cache), attention of the last query to key 0 — the class token — averaged
        over heads [B])."""
        cfg = self.cfg
        dt = cfg.compute_dtype
        qkv = _dense((3, cfg.n_head, cfg.head_dim), ("embed", None, "heads", "kv"), "wqkv", cfg)(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)
        q, k, v = (_constrain(t, ("act_batch", "act_length", "act_heads", "act_kv")) for t in (q, k, v))
        if cache_kv is not None and not prefill:
            out, attn0 = attn_lib.cached(q, k, v, *cache_kv, start)
        elif train and cfg.attn_dropout > 0:  # dropout on the probabilities: the explicit softmax
            probs = attn_lib.causal_probs(*(jnp.swapaxes(t, 1, 2) for t in (q, k)))
            attn0 = jnp.mean(probs[:, :, -1, 0], axis=1)
            probs = nn.Dropout(cfg.attn_dropout)(probs, deterministic=False)
            out = jnp.einsum("bhls,bshd->blhd", probs.astype(dt), v)
        else:
            if cfg.kernels == "xla_cpu":
                out = jnp.swapaxes(cpu_kernels.causal_attention(*(jnp.swapaxes(t, 1, 2) for t in (q, k, v))), 1, 2)
            else:
                out = attn_lib.causal(q, k, v, cfg.attention)
            attn0 = attn_lib.class_attention(q, k)
        new_kv = None if cache_kv is None else (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
        out = _dense(cfg.dim, ("heads", "kv", "embed"), "wo", cfg, in_axis=(-2, -1))(out)
        out = nn.Dropout(cfg.resid_dropout)(out, deterministic=not train)
        return out, new_kv, attn0


class FeedForward(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, *, train: bool):
        cfg = self.cfg
        if cfg.out_major_kernels:  # w1 and w3 as one kernel (`transpose_kernels`)
            h13 = _dense((2, cfg.ffn_dim), ("embed", None, "mlp"), "w13", cfg)(x)
            h1, h3 = h13[..., 0, :], h13[..., 1, :]
        else:
            h1 = _dense(cfg.ffn_dim, ("embed", "mlp"), "w1", cfg)(x)
            h3 = _dense(cfg.ffn_dim, ("embed", "mlp"), "w3", cfg)(x)
        h = _constrain(nn.silu(h1) * h3, ("act_batch", "act_length", "act_mlp"))
        out = _dense(cfg.dim, ("mlp", "embed"), "w2", cfg)(h)
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
    train: bool = False  # attributes, not call args, so nn.remat never traces them
    prefill: bool = False  # the cache is empty (start is 0): attend to the new keys only

    @nn.compact
    def __call__(self, x, rope, cache_kv=None, start=None, drop_rate=0.0):
        cfg, train = self.cfg, self.train
        use_dp = train and cfg.drop_path > 0
        h, new_cache, attn0 = Attention(cfg, name="attention")(
            RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attention_norm")(x), rope,
            train=train, cache_kv=cache_kv, start=start, prefill=self.prefill)
        x = x + (drop_path(h, drop_rate, self.make_rng("dropout")) if use_dp else h)
        h = FeedForward(cfg, name="feed_forward")(RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="ffn_norm")(x), train=train)
        x = x + (drop_path(h, drop_rate, self.make_rng("dropout")) if use_dp else h)
        return _constrain(x, ("act_batch", "act_length", "act_embed")), new_cache, attn0


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
    prefill: bool = False

    @nn.compact
    def __call__(self, carry, _):
        x, rope, cache, start, layer = carry
        block = _remat(TransformerBlock, self.cfg.remat)(self.cfg, self.train, self.prefill, name="block")
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
        # Prefill (start 0) runs the fused attention over the new keys; XLA:CPU runs these few-token
        # sequences faster as the decode's masked cache read (IAR2-B, 4 images: 59.7 s fused vs 50.1 s).
        prefill = cfg.kernels != "xla_cpu" and cache is not None and isinstance(start, int) and start == 0
        if cfg.scan_layers:
            scanned = nn.scan(
                _ScanBody,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=n,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, train, n, prefill, name="layers")
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
                x, new_kv, attn0 = block_cls(cfg, train, prefill, name=f"layers_{i}")(x, rope, kv, start,
                                                                                 drop_rate_i(i))
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
        self.output = _dense(cfg.vocab_size, ("embed", "vocab"), "output", cfg, kernel_init=nn.initializers.zeros)
        self.token_drop = nn.Dropout(cfg.token_dropout)
        self.rope = jnp.asarray(rope_table_2d(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cls_token_num))

    def _logits(self, h):
        return _constrain(self.output(h).astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))

    def _cls(self, labels, train):
        # One class token per cls_token_num slot (c2i uses a single one).
        e = self.cls_embedding(labels, train=train)[:, None, :]
        return jnp.repeat(e, self.cfg.cls_token_num, axis=1)

    def __call__(self, codes: Array, labels: Array, *, train: bool = False) -> Array:
        """codes [B, T] int, labels [B] int -> logits [B, T, V] (fp32); position t predicts codes[:, t]."""
        cfg = self.cfg
        # Under FSDP the tables are split on their embed axis, so looked-up rows come out embed-sharded:
        # XLA moves them to the batch-sharded layout with an all-to-all of B·T·D/fsdp activations (and
        # back for the gradient's scatter-add), cheaper than all-gathering a vocab x D table per step.
        x = jnp.concatenate([self._cls(labels, train), self.tok_embeddings(codes[:, :-1])], axis=1)
        x = self.token_drop(x.astype(cfg.compute_dtype), deterministic=not train)
        x = _constrain(x, ("act_batch", "act_length", "act_embed"))
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

"""Attention kernels of the GPT blocks, chosen by `model.attention` (a model setting, never the backend).

  * "dot_product" (default): `jax.nn.dot_product_attention`, causal. XLA fuses it on TPU and CPU;
    on GPU it selects cuDNN flash attention where the shapes and dtype allow.
  * "pallas_flash": the Pallas TPU flash-attention kernel (forward and gradient), run per shard
    with `shard_map` over the current mesh (a pallas_call cannot be partitioned by XLA). TPU only;
    sequences that are not a multiple of 128 (e.g. IAR2's 3-token head) use "dot_product".
Softmax is in fp32 in every path. The decode step (`cached`) reads the fixed-size KV cache with a
position mask, so its shapes never change inside the sampler's scan.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("dot_product", "pallas_flash")
_NEG = float(np.finfo(np.float32).min)


def causal_probs(q, k):
    """Softmax (fp32) of the causal scores of queries q [B, H, Lq, Dh], the last Lq of the keys
    k [B, H, S, Dh], over the keys: [B, H, Lq, S]."""
    lq, S = q.shape[2], k.shape[2]
    s = jnp.einsum("bhld,bhsd->bhls", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1]).astype(np.float32)
    causal = jnp.arange(S)[None, :] <= jnp.arange(S - lq, S)[:, None]
    return jax.nn.softmax(jnp.where(causal, s, _NEG), axis=-1)


def class_attention(q, k):
    """Head-mean attention weight of the last query to key 0 (the class token): [B]. q, k [B, L, H, Dh].
    Only this row is computed (the fused kernels keep their probabilities to themselves)."""
    qh, kh = jnp.swapaxes(q[:, -1:], 1, 2), jnp.swapaxes(k, 1, 2)
    return jnp.mean(causal_probs(qh, kh)[:, :, 0, 0], axis=1)


def causal(q, k, v, implementation: str = "dot_product"):
    """Causal self-attention, q, k, v [B, L, H, Dh] -> [B, L, H, Dh]. The named scope marks the
    kernel in the HLO (tests and benchmarks/tpu_aot.py check which one a program runs)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={implementation!r} is not one of {'|'.join(IMPLEMENTATIONS)}")
    if implementation == "pallas_flash" and q.shape[1] % 128 == 0:
        with jax.named_scope("attention_pallas_flash"):
            return _pallas_flash(q, k, v)
    with jax.named_scope("attention_dot_product"):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def _pallas_flash(q, k, v):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    L, dh = q.shape[1], q.shape[-1]
    b = next(s for s in (512, 256, 128) if L % s == 0)
    blocks = fa.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b,
                           block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b, block_k_dq=b,
                           block_q_dq=b)

    def kernel(q, k, v):  # head-major per shard
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
        out = fa.flash_attention(q, k, v, causal=True, sm_scale=float(1.0 / np.sqrt(dh)), block_sizes=blocks)
        return jnp.swapaxes(out, 1, 2)

    mesh = jax.sharding.get_abstract_mesh()  # the trainer's `sharding.mesh_rules` context
    if mesh.empty:
        return kernel(q, k, v)
    spec = nn.logical_to_mesh_axes(("act_batch", "act_length", "act_heads", "act_kv"))
    spec = P(*spec) if spec is not None else P()
    shards = [int(np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ())])) for s in spec]
    if any(n % s for n, s in zip(q.shape, shards)):
        # Only shape inference meets this (the trainer's init traces a 1-row dummy batch): the real
        # step's batch divides the data-parallel size (`sharding.check_global_batch`).
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def cached(q, k, v, cache_k, cache_v, start):
    """Queries q [B, L, H, Dh] at positions start .. start+L-1 over the cached keys/values
    [B, H, S, Dh] (valid below `start`) and, causally, the L new ones k, v [B, L, H, Dh].
    Returns (out [B, L, H, Dh], head-mean attention of the last query to key 0 [B])."""
    dt = q.dtype
    qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # head-major, as the cache
    S, L = cache_k.shape[2], q.shape[1]
    inv = np.float32(1.0 / np.sqrt(q.shape[-1]))
    s_old = jnp.einsum("bhld,bhsd->bhls", qh, cache_k.astype(dt)).astype(jnp.float32) * inv
    s_old = jnp.where((jnp.arange(S) < start)[None, None, None, :], s_old, _NEG)
    s_new = jnp.einsum("bhld,bhmd->bhlm", qh, kh).astype(jnp.float32) * inv
    s_new = jnp.where((jnp.arange(L)[None, :] <= jnp.arange(L)[:, None])[None, None], s_new, _NEG)
    probs = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1)  # fp32 softmax
    p_old, p_new = probs[..., :S], probs[..., S:]
    # Key 0 (the class token) is in the cache once start > 0, else the first new key.
    attn0 = jnp.mean(jnp.where(start > 0, p_old[:, :, -1, 0], p_new[:, :, -1, 0]), axis=1)
    out = (jnp.einsum("bhls,bhsd->blhd", p_old.astype(dt), cache_v.astype(dt))
           + jnp.einsum("bhlm,bhmd->blhd", p_new.astype(dt), vh))
    return out, attn0

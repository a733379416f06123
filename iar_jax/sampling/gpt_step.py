"""The sampling step of the LlamaGen GPT (IAR / LlamaGen): one token per position.

State = (KV cache, logits of the next token, attention of the query that produced them to the class
key). Step n draws token n from the held logits, then decodes it at sequence position
cls_token_num + n to get the logits of token n + 1. The last decode is not needed (1/T of the
work); it keeps the scan body uniform.

`prepare` runs once per sampler call, before the scan: it casts the weights to the compute dtype
(each decode step streams every weight once, so bf16 halves the bytes) and, with
`unroll_layers=True`, unstacks nn.scan's [n_layer, ...] weights into per-layer arrays so the decode
indexes no stacked weight with a loop counter (a dynamic slice that XLA materialises per layer
and step on CPU). With `kernels="xla_cpu"` it also transposes the kernels output-major
(`cpu_kernels.OutMajorDense`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from iar_jax.models.cpu_kernels import transpose_kernels
from iar_jax.models.gpt import GPT, GPTConfig, abstract_params, init_cache
from iar_jax.sampling.sampler import StepFns


def constrain_cache(cache):
    """Pins the batch (row) axis of a KV cache, whatever its layout: stacked [n_layer, B, ...]
    arrays or per-layer [B, ...] buffers."""
    def one(x):
        axes = [None] * x.ndim
        axes[1 if x.ndim == 5 else 0] = "act_batch"
        return nn.with_logical_constraint(x, tuple(axes))

    return jax.tree_util.tree_map(one, cache)


def unstack_layers(params, n_layer: int, part: str = "transformer"):
    """nn.scan layout (part/layers/block/... [n_layer, ...]) -> part/layers_i/... (scan_layers=False)."""
    sub = params.get(part, {})
    if "layers" not in sub:
        return params
    sub = dict(sub)
    block = sub.pop("layers")["block"]
    for i in range(n_layer):
        sub[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], block)
    return dict(params, **{part: sub})


def cast_params(params, dtype):
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return params
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def decode_model(module_cls, cfg, parts, abstract_params_fn, unroll_layers: bool = True,
                 out_major: Optional[bool] = None):
    """(module, config, prepare) of a family's decode model. The config has its layers unrolled
    (`unroll_layers`) and, with `kernels="xla_cpu"` (`out_major=None`; unrolled layers only),
    output-major kernels. `prepare` (StepFns.prepare) maps training-layout params to what a sampler step reads:
    unboxed, each (part, n_layer) of `parts` unstacked from the nn.scan layout, kernels transposed
    to the layout of `abstract_params_fn(config)`, cast to the compute dtype."""
    scan = cfg.scan_layers and not unroll_layers
    if out_major is None:
        out_major = cfg.kernels == "xla_cpu" and not scan
    elif out_major and scan:
        raise ValueError("output-major decode kernels need unrolled layers; pass unroll_layers=True")
    stacks = parts if cfg.scan_layers and not scan else ()
    cfg = dataclasses.replace(cfg, scan_layers=scan, out_major_kernels=out_major)
    out_major_shapes = abstract_params_fn(cfg) if out_major else None

    def prepare(params):
        params = nn.unbox(params)
        for part, n in stacks:
            params = unstack_layers(params, n, part)
        if out_major_shapes is not None:
            params = transpose_kernels(params, out_major_shapes)
        return cast_params(params, cfg.compute_dtype)

    return module_cls(cfg), cfg, prepare


def step_fns(module: GPT, cfg: GPTConfig, unroll_layers: bool = True, out_major: Optional[bool] = None) -> StepFns:
    """The GPT's `StepFns`. Takes params in the training layout (nn.scan-stacked or not); the KV
    cache layout is whatever `gpt.init_cache` builds for the decode config (`decode_model`)."""
    module, cfg, prepare = decode_model(GPT, cfg, (("transformer", cfg.n_layer),), abstract_params,
                                        unroll_layers, out_major)

    def init_state(params, rows):
        cache = init_cache(cfg, rows.shape[0], cfg.seq_len, cfg.compute_dtype)
        cache = constrain_cache(cache)
        logits, cache, attn0 = module.apply({"params": params}, rows, cache, method=GPT.prefill)
        return {"cache": cache, "logits": logits, "attn": attn0}

    def step(params, state, ctx):
        tok = ctx.sample(0, state["logits"], ctx.cond(state["attn"]))
        logits, cache, attn0 = module.apply(
            {"params": params}, ctx.rows(tok), cfg.cls_token_num + ctx.n, state["cache"], method=GPT.decode)
        return {"cache": cache, "logits": logits, "attn": attn0}, tok[:, None]

    return StepFns(num_positions=cfg.num_tokens, null_class=cfg.num_classes, sub_tokens=("token",),
                   init_state=init_state, step=step, vocab_sizes=(cfg.vocab_size,), prepare=prepare)

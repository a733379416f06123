"""Benchmark cost estimates per model family: model FLOPs of a training step (forward + backward
matmuls, no remat) and the bytes one sampling position reads (weights, KV caches).

Used by `benchmarks/train_step.py`, `benchmarks/sample_speed.py` and `iar_jax.aot` for MFU and
bandwidth floors; the trainer and sampler never need them.
"""
from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from iar_jax.models import gpt, iar2


def matmul_weight_bytes(params, dtype, repeat: Optional[Dict[str, int]] = None) -> int:
    """Bytes of the weights in `dtype`, skipping embedding tables (gathered, not streamed); a
    top-level part named in `repeat` counts that many times (it runs more than once per position)."""
    itemsize, total = jnp.dtype(dtype).itemsize, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", k)) for k in path]
        if any("embedding" in n for n in names):  # tok_embeddings/embedding, cls_embedding/embedding_table
            continue
        total += int(np.prod(leaf.shape)) * itemsize * (repeat or {}).get(names[0], 1)
    return total


def kv_bytes(n_layer: int, rows: int, positions: float, dim: int, dtype) -> float:
    """Bytes of keys + values of `positions` cache entries in each of `n_layer` layers."""
    return 2.0 * n_layer * rows * positions * dim * jnp.dtype(dtype).itemsize


def _iar_decode_bytes(cfg, params, rows, dtype):
    # Decode step n attends to the class token(s) and n image tokens: cls + T/2 entries on average.
    return {"weights": matmul_weight_bytes(params, dtype),
            "kv_full": kv_bytes(cfg.n_layer, rows, cfg.seq_len, cfg.dim, dtype),
            "kv_avg": kv_bytes(cfg.n_layer, rows, cfg.cls_token_num + cfg.num_tokens / 2, cfg.dim, dtype)}


def _iar_train_flops(cfg, batch: int) -> float:
    """6 · non-embedding params · tokens, plus the attention score/value products (fwd + bwd)."""
    params = gpt.abstract_params(cfg)
    seq = cfg.seq_len - 1  # the teacher-forced forward: class token(s) + the first T-1 codes
    n = gpt.count_params(params) - gpt.count_params({k: v for k, v in params.items() if "embedding" in k})
    attn = 6.0 * 2 * cfg.n_layer * cfg.n_head * seq * seq * cfg.head_dim * batch  # QK^T and PV
    return 6.0 * n * batch * seq + attn


def _iar2_decode_bytes(cfg, params, rows: int, dtype):
    """Every matrix once except the gathered embedding tables, the head blocks twice (semantic,
    then detail pass); the trunk cache (step n attends to n + 1 entries: (T + 1) / 2 on average)
    and the 3-entry head cache. The window's 12 compressed slots are negligible."""
    T = cfg.num_tokens
    head = kv_bytes(cfg.head_layers, rows, iar2.HEAD_LEN, cfg.dim, dtype)
    return {"weights": matmul_weight_bytes(params, dtype, repeat={"head": 2}),
            "kv_full": kv_bytes(cfg.n_layer, rows, T, cfg.dim, dtype) + head,
            "kv_avg": kv_bytes(cfg.n_layer, rows, (T + 1) / 2, cfg.dim, dtype) + head}


def _iar2_train_flops(cfg, batch: int) -> float:
    """6 · matmul weights · tokens per part, plus attention products (fwd + bwd). Tokens per
    example: fusion T − 1 (the last position feeds nothing), trunk / window / output MLPs T, head
    3T ([h_ctx, h_t, E_s(k_t)] per position)."""
    T = cfg.num_tokens
    tokens = {"fusion": T - 1, "trunk": T, "local_context": T, "head": iar2.HEAD_LEN * T, "sem_output": T, "det_output": T}
    dense = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(iar2.abstract_params(cfg)):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "kernel":
            dense += 6.0 * int(np.prod(leaf.shape)) * tokens[names[0]] * batch
    attn = 6.0 * 2 * cfg.dim * batch * (cfg.n_layer * T * T + cfg.head_layers * T * iar2.HEAD_LEN ** 2)  # QK^T and PV
    return dense + attn


_TRAIN_FLOPS = {"iar": _iar_train_flops, "iar2": _iar2_train_flops}
_DECODE_BYTES = {"iar": _iar_decode_bytes, "iar2": _iar2_decode_bytes}


def _lookup(table, family: str):
    if family not in table:
        raise ValueError(f"no cost model for model_family {family!r}; costs are known for {sorted(table)}")
    return table[family]


def train_flops(family: str, cfg, batch: int) -> float:
    """Model FLOPs of one training step of `batch` examples of `family` with model config `cfg`."""
    return _lookup(_TRAIN_FLOPS, family)(cfg, batch)


def decode_bytes(family: str, cfg, params, rows: int, dtype) -> Dict[str, float]:
    """What one sampling position of `rows` rows reads in `dtype`: {"weights": bytes of weights it
    streams, "kv_full": bytes of its fixed-size attention caches, "kv_avg": their valid part, averaged}."""
    return _lookup(_DECODE_BYTES, family)(cfg, params, rows, dtype)
